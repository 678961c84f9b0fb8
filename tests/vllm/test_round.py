"""One real round with `model.engine: vllm` (what `flywheel run --rounds 1 --engine vllm` runs), through
Prefect, into Parquet, DuckDB and MLflow, its tables checked as tests/integration/test_end_to_end.py
checks the hf round's, at its sizes (run_checks.small_round). The session's vLLM engine is the round's policy engine
for round 0's benchmark, generate and judge; the train stage closes it and the trained round's
benchmark opens vLLM on the new checkpoint. It runs last (the file's name sorts after the others)."""

from __future__ import annotations

import time

import pytest
from run_checks import assert_every_table_matches_its_schema, small_round


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_harness, vllm_engine, vllm_model):
    import mlflow

    from flywheel.config import load_config
    from flywheel.flows.flywheel import flywheel

    ws = tmp_path_factory.mktemp("ws")
    config = load_config(None, small_round("e2e-vllm", ws, 1, model=vllm_model().model_dump(mode="json")))
    assert config.model.engine == "vllm"
    start = time.monotonic()
    result = flywheel(config)
    print(f"\n  one round with engine vllm (round 0 and round 1): {time.monotonic() - start:.0f} s")
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    return ws, config, result


def test_every_table_exists_and_matches_its_schema(run):
    ws, _, result = run
    assert_every_table_matches_its_schema(ws, result["run_id"])


def test_round_tables(run):
    from flywheel import seeds
    from flywheel.storage import catalog

    ws, config, _ = run
    rounds = catalog.query(ws, "SELECT * FROM rounds ORDER BY round").to_pylist()
    assert [r["round"] for r in rounds] == [0, 1] and {r["status"] for r in rounds} == {"completed"}
    assert rounds[1]["policy_in"] == rounds[0]["policy_out"] == rounds[0]["policy_in"]
    # the gate decided, and said why (its rules are tasks/promote.py's, whatever the engine)
    assert isinstance(rounds[1]["promoted"], bool) and rounds[1]["promotion_reasons"]
    print(f"\n  round 1 promoted: {rounds[1]['promoted']} ({rounds[1]['promotion_reasons']})")
    assert {r["config_hash"] for r in rounds} == {config.hash()}
    assert rounds[1]["registered_version"] == "1"

    cands = catalog.query(ws, "SELECT c.*, p.prompt FROM candidates c JOIN prompts p USING (prompt_id)").to_pylist()
    assert len(cands) == 8 * 4 and {c["round"] for c in cands} == {1}
    assert all(c["n_tokens"] > 0 and c["mean_logprob"] is not None for c in cands)
    # each sample's seed is flywheel's per-sample seed, the one vLLM was given
    stage_seed = seeds.stage(config.seed, 1)
    assert all(c["seed"] == seeds.row(stage_seed, c["prompt"], c["sample_index"]) for c in cands)

    rows = catalog.query(
        ws, "SELECT j.source, c.prompt_id, j.score, j.parse_ok FROM judgments j JOIN candidates c USING (candidate_id)"
    ).to_pylist()
    verifier = [r for r in rows if r["source"] == "verifier"]
    judged = [r for r in rows if r["source"] == "llm_judge"]
    assert len(verifier) == 8 * 4
    spread: dict = {}
    for r in verifier:
        spread.setdefault(r["prompt_id"], set()).add(r["score"])
    contested = {p for p, s in spread.items() if len(s - {None}) > 1}
    assert sorted(r["prompt_id"] for r in judged) == sorted(
        r["prompt_id"] for r in verifier if r["prompt_id"] in contested
    )
    assert not [r for r in judged if not r["parse_ok"] and r["score"] is not None]

    health = catalog.query(ws, "SELECT DISTINCT source, model, method FROM judge_health").to_pylist()
    judge = [h for h in health if h["source"] == "llm_judge"]
    if judged:  # the judge ran on the round's vLLM engine, reading top log-probs
        assert judge and all(h["model"].startswith("vllm:") and h["method"] == "top_logprobs_20" for h in judge)

    bench = catalog.query(
        ws, "SELECT round, count(*) n FROM benchmarks WHERE suite = 'chain_sum-test' GROUP BY round ORDER BY round"
    ).to_pylist()
    assert [b["n"] for b in bench] == [16, 16]


def test_pairs_are_strictly_ordered(run):
    from flywheel.storage import catalog

    ws, _, _ = run
    for p in catalog.query(ws, "SELECT * FROM pairs").to_pylist():
        assert p["chosen"] != p["rejected"] and p["chosen_score"] > p["rejected_score"]
        assert p["margin"] == pytest.approx(p["chosen_score"] - p["rejected_score"])


def test_mlflow_round_run(run):
    import mlflow

    _, config, result = run
    client = mlflow.MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [r.data.tags["flywheel.round"] for r in children] == ["1"]
    assert children[0].data.params["cfg.model.engine"] == "vllm"
    versions = client.search_model_versions(f"name = '{config.name}'")
    assert [int(v.version) for v in versions] == [1]
