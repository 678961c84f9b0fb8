"""The label-free preset (majority vote + self-certainty + the policy's own judge, no verifier):
one small round on the real embedded model, through Prefect, into Parquet, DuckDB and MLflow."""

import pytest

pytestmark = pytest.mark.slow


def test_label_free_round_end_to_end(tmp_path, prefect_harness):
    from flywheel.config import load_config
    from flywheel.flows.flywheel import flywheel
    from flywheel.storage import catalog

    config = load_config(None, {
        "name": "label-free", "rounds": 1, "workspace": str(tmp_path),
        "task": {"prompts_per_round": 8}, "sampling": {"n": 4},
        "benchmark": {"size": 16, "validation_size": 8, "guards": [], "max_new_tokens": 32},
        "train": {"dpo": {"num_train_epochs": 1}},
    }, preset="label_free")
    result = flywheel(config)
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    q = lambda sql: catalog.query(tmp_path, sql).to_pylist()  # noqa: E731
    sources = q("SELECT source, count(*) n FROM judgments GROUP BY source ORDER BY source")
    assert sources == [{"source": s, "n": 32} for s in ("llm_judge", "majority_vote", "self_certainty")]
    # majority vote: every scored candidate either agrees with its prompt's pseudo-label or not
    votes = q("SELECT score, details FROM judgments WHERE source = 'majority_vote' AND score IS NOT NULL")
    assert votes and {v["score"] for v in votes} <= {0.0, 1.0}
    pairs = q("SELECT * FROM pairs")
    assert all(p["reward"] == "1*majority_vote+0.5*llm_judge+0.25*self_certainty" for p in pairs)
    assert all(p["chosen_score"] - p["rejected_score"] >= 0.5 for p in pairs)
    health = {(h["source"], h["metric"]): h["value"] for h in q("SELECT * FROM judge_health")}
    assert ("majority_vote", "pseudo_label_accuracy") in health
    assert 0.0 <= health[("llm_judge", "parse_failure_rate")] <= 1.0
    assert not any(s == "verifier" for s, _ in health), "no verifier in the loop"
    rounds = q("SELECT status FROM rounds ORDER BY round")
    assert [r["status"] for r in rounds] == ["completed", "completed"]
