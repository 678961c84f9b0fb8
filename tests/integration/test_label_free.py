"""The label-free preset (majority vote with a confidence filter, self-certainty recorded, no verifier):
one small round on the real embedded model, through Prefect, into Parquet, DuckDB and MLflow."""

import pytest

pytestmark = pytest.mark.slow


def test_label_free_round_end_to_end(tmp_path, prefect_harness):
    from flywheel.config import load_config
    from flywheel.flows.flywheel import flywheel
    from flywheel.storage import catalog

    config = load_config(
        None,
        {
            "name": "label-free",
            "rounds": 1,
            "workspace": str(tmp_path),
            "task": {"prompts_per_round": 8},
            "sampling": {"n": 4},
            "benchmark": {"size": 16, "validation_size": 8, "guards": [], "max_new_tokens": 32},
            "train": {"dpo": {"num_train_epochs": 1}},
        },
        preset="label_free",
    )
    result = flywheel(config)
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    q = lambda sql: catalog.query(tmp_path, sql).to_pylist()  # noqa: E731
    sources = q("SELECT source, count(*) n FROM judgments GROUP BY source ORDER BY source")
    assert sources == [{"source": s, "n": 32} for s in ("majority_vote", "self_certainty")]
    # majority vote: a candidate of a prompt whose pseudo-label holds ≥ half the samples agrees with it
    # or not (1/0); below half, the prompt is left unscored (no pair can come from it)
    import json

    votes = q("SELECT prompt_id, score, details FROM judgments WHERE source = 'majority_vote'")
    assert votes
    for v in votes:
        share = json.loads(v["details"])["vote_share"]
        if share < 0.5:
            assert v["score"] is None
        elif v["score"] is not None:
            assert v["score"] in (0.0, 1.0)
    sure = {v["prompt_id"] for v in votes if json.loads(v["details"])["vote_share"] >= 0.5}
    pairs = q("SELECT * FROM pairs")
    assert all(p["reward"] == "majority_vote" and p["prompt_id"] in sure for p in pairs)
    assert all(p["chosen_score"] == 1.0 and p["rejected_score"] == 0.0 for p in pairs)
    health = {(h["source"], h["metric"]): h["value"] for h in q("SELECT * FROM judge_health")}
    assert ("majority_vote", "pseudo_label_accuracy") in health
    assert ("self_certainty", "length_correlation") in health
    assert not any(s == "verifier" for s, _ in health), "no verifier in the loop"
    rounds = q("SELECT status FROM rounds ORDER BY round")
    assert [r["status"] for r in rounds] == ["completed", "completed"]
