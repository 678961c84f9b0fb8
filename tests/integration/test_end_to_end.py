"""Two small rounds on the real embedded model, through Prefect, into real Parquet, DuckDB and MLflow."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROUND_METRICS = ("accuracy", "pairs", "mean_margin", "judge_verifier_agreement", "judge_parse_failure_rate",
                 "generate_seconds", "judge_seconds", "train_seconds", "benchmark_seconds", "mean_response_tokens",
                 "pair_length_gap", "prompts_no_signal", "sft_examples", "decontaminated_prompts")


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_harness):
    import mlflow

    from flywheel.config import load_config
    from flywheel.flows.flywheel import flywheel

    ws = tmp_path_factory.mktemp("ws")
    config = load_config(None, {
        "name": "e2e", "rounds": 2, "workspace": str(ws),
        "task": {"prompts_per_round": 8},
        "sampling": {"n": 4, "max_new_tokens": 32},
        "judge": {"batch_size": 16},
        "benchmark": {"size": 16, "max_new_tokens": 32},
        "train": {"dpo": {"num_train_epochs": 1, "learning_rate": 1e-4}},
    })
    result = flywheel(config)
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    return ws, config, result


def test_every_table_exists_and_matches_its_schema(run):
    from flywheel.storage.schemas import TABLES

    ws, _, result = run
    for name, schema in TABLES.items():
        files = sorted((ws / "tables" / name).glob(f"run_id={result['run_id']}/round=*/*.parquet"))
        assert files, f"no {name} files"
        for f in files:
            assert pq.read_schema(f).equals(schema), f
    assert not list(ws.rglob("*.tmp")), "a temporary file was left behind"


def test_duckdb_views_answer(run):
    from flywheel.storage import catalog

    ws, config, result = run
    rounds = catalog.query(ws, "SELECT * FROM rounds ORDER BY round").to_pylist()
    assert [r["round"] for r in rounds] == [0, 1, 2] and {r["status"] for r in rounds} == {"completed"}
    # lineage: a round starts from the champion (the last promoted model); its DPO reference is the base;
    # a round is promoted when its accuracy is at least the champion's
    assert rounds[1]["policy_in"] == rounds[0]["policy_out"] == rounds[0]["policy_in"]
    assert rounds[1]["promoted"] == (rounds[1]["accuracy"] >= rounds[0]["accuracy"])
    champion = rounds[1] if rounds[1]["promoted"] else rounds[0]
    assert rounds[2]["policy_in"] == champion["policy_out"] and rounds[2]["reference_model"] == rounds[0]["policy_in"]
    assert rounds[2]["promoted"] == (rounds[2]["accuracy"] >= champion["accuracy"])
    assert {r["config_hash"] for r in rounds} == {config.hash()}
    assert rounds[1]["judge_template_hash"] and rounds[1]["registered_version"] == "1"
    counts = catalog.query(ws, """
        SELECT c.round, count(DISTINCT c.candidate_id) AS n, count(j.candidate_id) AS judged
        FROM candidates c JOIN judgments j USING (candidate_id) GROUP BY c.round ORDER BY c.round""").to_pylist()
    assert [c["n"] for c in counts] == [8 * 4, 8 * 4]
    assert [c["judged"] for c in counts] == [8 * 4 * 2, 8 * 4 * 2]  # verifier + llm_judge per candidate
    bench = catalog.query(ws, "SELECT round, count(*) n FROM benchmarks GROUP BY round ORDER BY round").to_pylist()
    assert [b["n"] for b in bench] == [16, 16, 16]
    # an unparsed judge output is a row with score NULL, never a dropped row
    bad = catalog.query(ws, "SELECT count(*) n FROM judgments WHERE source='llm_judge' AND NOT parse_ok "
                            "AND score IS NOT NULL").to_pylist()
    assert bad == [{"n": 0}]


def test_pairs_are_strictly_ordered(run):
    from flywheel.storage import catalog

    ws, _, _ = run
    pairs = catalog.query(ws, "SELECT * FROM pairs").to_pylist()
    assert pairs, "two rounds of 8 prompts × 4 samples should yield pairs"
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        assert p["chosen_score"] > p["rejected_score"]
        assert p["margin"] == pytest.approx(p["chosen_score"] - p["rejected_score"])


def test_mlflow_parent_with_nested_rounds_and_registered_models(run):
    import mlflow

    ws, config, result = run
    client = mlflow.MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["cfg.rounds"] == "2"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["flywheel.round"] for r in children) == ["1", "2"]
    for child in children:
        missing = [m for m in ROUND_METRICS if m not in child.data.metrics]
        assert not missing, f"round {child.data.tags['flywheel.round']} lacks {missing}"
        assert "loss" in child.data.metrics or "train_loss" in child.data.metrics  # TRL's own reporting
        assert child.data.params["cfg.sampling.n"] == "4"
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"samples", "pairs", "data_card"} <= artifacts
    versions = client.search_model_versions(f"name = '{config.name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {c.info.run_id for c in children}


def test_round_one_weights_differ_from_base(run):
    from flywheel.models import loading

    ws, _, result = run
    base = load_file(str(Path(loading.resolve("embedded:smollm2-135m-instruct")) / "model.safetensors"))
    r1 = load_file(str(ws / "checkpoints" / f"run_id={result['run_id']}" / "round=1" / "model.safetensors"))
    assert base.keys() == r1.keys()
    changed = [k for k in base if not torch.equal(base[k], r1[k])]
    assert changed, "DPO left every weight unchanged"
    assert any("q_proj" in k or "v_proj" in k for k in changed)


def test_plot_and_data_cards_written(run):
    ws, _, result = run
    png = ws / "runs" / result["run_id"] / "rounds.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k in (1, 2):
        card = ws / "runs" / result["run_id"] / f"round={k}" / "data_card.md"
        assert "| candidates sampled | 32 |" in card.read_text()
        assert card.with_name("data_card.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_registered_model_loads_and_answers(run):
    import mlflow

    _, config, _ = run
    model = mlflow.pyfunc.load_model(f"models:/{config.name}/2")
    answers = model.predict(["State the final answer to the following arithmetic problem: 2 + 3 ="],
                            params={"max_new_tokens": 16})
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0]
