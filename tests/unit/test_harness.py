"""How lm-evaluation-harness results become flywheel's metrics and benchmark rows (pure functions)."""

from flywheel.models import harness


def test_metric_names_keep_the_filter_unless_it_is_none():
    assert harness._metric_name("acc,none") == "acc"
    assert harness._metric_name("exact_match,strict-match") == "exact_match.strict-match"


def test_a_multiple_choice_response_is_the_choice_of_highest_log_likelihood():
    assert harness._response([(-3.2, False), (-0.4, True), (-1.0, False)]) == "choice 1"
    assert harness._response([["  42"]]) == "  42"
    assert harness._response(["7"]) == "7"
    assert harness._response([]) == "" and harness._response([[]]) == "" and harness._response(None) == ""


def test_a_row_carries_the_samples_metric_and_a_stable_id():
    sample = {
        "doc": {"q": "1 + 1", "a": "2"},
        "target": "2",
        "filtered_resps": ["2"],
        "metrics": ["exact_match"],
        "exact_match": 1.0,
    }
    row = harness._row(sample, "exact_match")
    assert row["response"] == "2" and row["score"] == 1.0 and row["extracted"] == "2"
    assert row["item_id"] == harness._row(dict(sample, filtered_resps=["3"], exact_match=0.0), "exact_match")["item_id"]
    assert harness._row(dict(sample, doc={"q": "2 + 2"}), "exact_match")["item_id"] != row["item_id"]
    assert harness._row(sample, None)["score"] is None
