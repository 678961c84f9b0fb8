"""Two small rounds on the real embedded model, through Prefect, into real Parquet, DuckDB and MLflow."""

import json
from pathlib import Path

import pytest
import torch
from run_checks import assert_every_table_matches_its_schema, small_round
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROUND_METRICS = (
    "accuracy",
    "pairs",
    "mean_margin",
    "judge_verifier_agreement",
    "judge_parse_failure_rate",
    "generate_seconds",
    "judge_seconds",
    "train_seconds",
    "benchmark_seconds",
    "mean_response_tokens",
    "pair_length_gap",
    "prompts_no_signal",
    "sft_examples",
    "decontaminated_prompts",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_harness):
    import mlflow

    from flywheel.config import load_config
    from flywheel.flows.flywheel import flywheel

    ws = tmp_path_factory.mktemp("ws")
    transfer = [{"name": "three_terms", "options": {"min_terms": 3, "max_terms": 3}, "size": 8}]
    config = load_config(None, small_round("e2e", ws, 2, benchmark={"transfer": transfer}))
    result = flywheel(config)
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    return ws, config, result


def test_every_table_exists_and_matches_its_schema(run):
    ws, _, result = run
    assert_every_table_matches_its_schema(ws, result["run_id"])


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
    counts = catalog.query(
        ws,
        """
        SELECT c.round, count(DISTINCT c.candidate_id) AS n, count(j.candidate_id) AS judged
        FROM candidates c JOIN judgments j USING (candidate_id) GROUP BY c.round ORDER BY c.round""",
    ).to_pylist()
    assert [c["n"] for c in counts] == [8 * 4, 8 * 4]
    # the verifier judges every candidate; the LLM judge (judge.subset: auto, which is contested when
    # the pairs come from the verifier alone) those of the prompts whose verifier scores differ
    rows = catalog.query(
        ws, "SELECT j.round, j.source, c.prompt_id, j.score FROM judgments j JOIN candidates c USING (candidate_id)"
    ).to_pylist()
    for k in (1, 2):
        spread: dict = {}
        for r in rows:
            if r["round"] == k and r["source"] == "verifier":
                spread.setdefault(r["prompt_id"], set()).add(r["score"])
        contested = {p for p, scores in spread.items() if len(scores - {None}) > 1}
        verifier = [r for r in rows if r["round"] == k and r["source"] == "verifier"]
        judged = [r for r in rows if r["round"] == k and r["source"] == "llm_judge"]
        assert len(verifier) == 8 * 4
        assert sorted(r["prompt_id"] for r in judged) == sorted(
            r["prompt_id"] for r in verifier if r["prompt_id"] in contested
        )
        assert result["rounds"][k]["judge_subset"] == "contested"
    bench = catalog.query(
        ws, "SELECT round, count(*) n FROM benchmarks WHERE suite = 'chain_sum-test' GROUP BY round ORDER BY round"
    ).to_pylist()
    assert [b["n"] for b in bench] == [16, 16, 16]
    # an unparsed judge output is a row with score NULL, never a dropped row
    bad = catalog.query(
        ws, "SELECT count(*) n FROM judgments WHERE source='llm_judge' AND NOT parse_ok AND score IS NOT NULL"
    ).to_pylist()
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

    _ws, config, result = run
    client = mlflow.MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["cfg.rounds"] == "2"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
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
    answers = model.predict(
        ["State the final answer to the following arithmetic problem: 2 + 3 ="], params={"max_new_tokens": 16}
    )
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0]


def _sha(path: Path) -> str:
    from flywheel.models import loading

    return loading.weights_hash(str(path))


def test_the_benchmarked_model_is_the_registered_one(run, tmp_path):
    """Same weights hash in the rounds table, the checkpoint the benchmark ran, the round's MLflow
    run, the registry version's tags, and the registered model's own files."""
    import mlflow

    from flywheel.storage import catalog

    ws, config, _result = run
    client = mlflow.MlflowClient()
    rounds = catalog.query(ws, "SELECT * FROM rounds WHERE round > 0 ORDER BY round").to_pylist()
    for r in rounds:
        benchmarked = catalog.query(ws, f"SELECT DISTINCT model FROM benchmarks WHERE round = {r['round']}").to_pylist()
        assert [b["model"] for b in benchmarked] == [r["policy_out"]]
        assert r["weights_sha256"] == _sha(Path(r["policy_out"])), "rounds table vs the benchmarked checkpoint"
        assert client.get_run(r["mlflow_run_id"]).data.tags["flywheel.weights_sha256"] == r["weights_sha256"]
        version = client.get_model_version(config.name, r["registered_version"])
        assert version.run_id == r["mlflow_run_id"]
        assert version.tags["weights_sha256"] == r["weights_sha256"]
        assert (
            version.tags["flywheel.round"] == str(r["round"]) and version.tags["promoted"] == str(r["promoted"]).lower()
        )
        # versions carry the headline (test exact match) and name the partial-credit mean for what it is
        exact = client.get_run(r["mlflow_run_id"]).data.metrics["exact_match"]
        assert version.tags["exact_match"] == f"{exact:.4f}" and version.tags["mean_score"] == f"{r['accuracy']:.4f}"
        assert f"round {r['round']}: test exact match {exact:.1%}" in version.description
        local = mlflow.artifacts.download_artifacts(
            f"models:/{config.name}/{r['registered_version']}", dst_path=str(tmp_path / r["registered_version"])
        )
        (pointer,) = (Path(local) / "artifacts").iterdir()  # registry.weights: reference, the default
        reference = json.loads(pointer.read_text())
        assert reference["weights_sha256"] == r["weights_sha256"], "registry vs rounds table"
        assert _sha(Path(reference["checkpoint"])) == r["weights_sha256"], "the checkpoint the registry points at"


def test_champion_alias_points_at_the_best_promoted_round(run):
    import mlflow

    from flywheel.storage import catalog

    ws, config, result = run
    rounds = catalog.query(
        ws, "SELECT * FROM rounds WHERE promoted AND round > 0 ORDER BY accuracy DESC, round DESC"
    ).to_pylist()
    client = mlflow.MlflowClient()
    if not rounds:
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_model_version_by_alias(config.name, "champion")
        return
    champion = client.get_model_version_by_alias(config.name, "champion")
    assert str(champion.version) == rounds[0]["registered_version"]
    assert result["champion"] == rounds[0]["policy_out"]


def test_registered_model_loads_without_pickle_or_flywheel(run, tmp_path):
    """Logged from code: no pickle in its files, requirements pin torch and transformers (never
    the unrelated `flywheel` of PyPI), and it loads and answers in a process that cannot import flywheel."""
    import subprocess
    import sys

    import mlflow

    _ws, config, _ = run
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{config.name}/1", dst_path=str(tmp_path / "m")))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    reqs = (local / "requirements.txt").read_text().split()
    assert not [r for r in reqs if r.split("=")[0].strip().lower() == "flywheel"], reqs
    assert any(r.startswith("torch==") for r in reqs) and any(r.startswith("transformers==") for r in reqs)
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "flywheel" or name.startswith("flywheel."):
            raise ImportError("flywheel is not installed here")
sys.meta_path.insert(0, Block())
import mlflow
model = mlflow.pyfunc.load_model({str(local)!r})
print("ANSWER:", model.predict(["What is 2 + 3?"], params={{"max_new_tokens": 8}})[0])
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0 and "ANSWER:" in p.stdout, p.stderr[-3000:]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def test_registry_references_the_checkpoint_instead_of_copying_it(run, tmp_path):
    """registry.weights: reference (the default) stores each round's weights once: the registered
    model is a pointer (path and weights hash) to the workspace's checkpoint. A pointer whose
    checkpoint is gone says so; registry.weights: copy puts the weights themselves in MLflow."""
    import shutil

    import mlflow

    from flywheel.storage import catalog, tracking

    ws, config, _result = run
    r1 = catalog.query(ws, "SELECT policy_out, weights_sha256, mlflow_run_id FROM rounds WHERE round = 1").to_pylist()[
        0
    ]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{config.name}/1", dst_path=str(tmp_path / "ref")))
    pointer = json.loads(next(local.rglob(tracking.REFERENCE)).read_text())
    assert pointer == {"checkpoint": str(Path(r1["policy_out"]).resolve()), "weights_sha256": r1["weights_sha256"]}
    checkpoint = _size(r1["policy_out"])
    print(f"\nregistered model artifacts: {_size(local) / 1024:.0f} KiB for a {checkpoint / 2**20:.0f} MiB checkpoint")
    assert not list(local.rglob("*.safetensors")) and _size(local) < 1 << 20

    moved = tmp_path / "moved"
    shutil.copytree(r1["policy_out"], moved)
    version = tracking.log_and_register_model(r1["mlflow_run_id"], moved, "e2e-moved", weights="reference")
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match=r"references the checkpoint .*moved, which is not here"):
        mlflow.pyfunc.load_model(f"models:/e2e-moved/{version}")

    version = tracking.log_and_register_model(r1["mlflow_run_id"], Path(r1["policy_out"]), "e2e-copied", weights="copy")
    copied = Path(mlflow.artifacts.download_artifacts(f"models:/e2e-copied/{version}", dst_path=str(tmp_path / "c")))
    assert list(copied.rglob("*.safetensors")) and _size(copied) >= checkpoint


def test_round_runs_carry_flywheel_params_and_trl_config_as_an_artifact(run):
    import mlflow

    _ws, _config, result = run
    client = mlflow.MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    for child in children:
        params = child.data.params
        assert "learning_rate" not in params and "per_device_train_batch_size" not in params, "TRL's own params"
        assert all(
            k.startswith("cfg.") or k in ("round", "policy_in", "base_model", "train.world_size", "train.reference")
            for k in params
        ), sorted(params)
        assert params.get("train.world_size", "1") == "1"  # trained (if at all) in the stage's process
        assert params["cfg.sampling.max_new_tokens"] == "32", "token counts are not masked as secrets"
        trl = client.download_artifacts(child.info.run_id, "train/trl_config.json")
        assert '"beta": 0.1' in Path(trl).read_text()
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")], "training loss by step"
    # per-round curves hold one point per round; end-of-run figures have keys of their own, at the last step
    for key in ("accuracy_gain", "exact_match"):
        history = client.get_metric_history(parent.info.run_id, key)
        assert len(history) == len({m.step for m in history}), f"{key}: a second point on a round's step"
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "run.exact_match_gain")] == [2]
    # stage times on the parent, one point per round
    for key in ("generate_seconds", "judge_seconds", "train_seconds", "benchmark_seconds"):
        steps = [0, 1, 2] if key == "benchmark_seconds" else [1, 2]  # round 0 only benchmarks
        assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, key)) == steps, key


def test_prefect_shows_named_runs_their_logs_and_round_summaries(run):
    import logging

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    _ws, _config, result = run
    for h in logging.getLogger("prefect.flow_runs").handlers:
        h.flush()
    run_id = result["run_id"]
    with get_client(sync_client=True) as client:
        named = lambda n: client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[n])))  # noqa
        (parent,) = named(run_id)  # the parent flow run is named after the flywheel run
        parent_logs = [
            lg.message
            for lg in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[parent.id])))
        ]
        for k in (1, 2):  # the parent's log says where each round's story is
            assert any(m.startswith(f"round {k}: ") and f"flow run {run_id}-round-{k}" in m for m in parent_logs)
        for k in (1, 2):
            (fr,) = named(f"{run_id}-round-{k}")
            logs = [
                lg.message
                for lg in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])))
            ]
            assert any(m.startswith(f"round {k}: generate done in") and "candidates=" in m for m in logs), logs
            assert any(m.startswith(f"round {k}: ") and "promoted" in m for m in logs), logs
            arts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id]))
            )
            assert [a.key for a in arts] == [f"flywheel-{run_id}-summary"]  # keyed by run: workspaces never mix
            assert f"round {k}" in arts[0].data and "test exact match" in arts[0].data
        tasks = {t.name for t in client.read_task_runs()}
        assert {"generate-round-1", "train-round-2", "benchmark-round-0 (baseline)"} <= tasks


def test_rounds_report_exact_match_and_the_paired_gain_with_intervals(run):
    _ws, config, result = run
    for r in result["rounds"]:
        assert r["exact_match_low"] <= r["exact_match"] <= r["exact_match_high"]
        assert r["exact_match"] <= r["accuracy"]  # full credit only, never more than the mean credit
    for r in result["rounds"][1:]:
        assert r["paired_items"] == config.benchmark.size
        assert r["accuracy_gain_low"] <= r["accuracy_gain"] <= r["accuracy_gain_high"]
        # the point gain is this round's accuracy minus its champion's, on the same items
        champion = max((p for p in result["rounds"][: r["round"]] if p["promoted"]), key=lambda p: p["round"])
        assert r["accuracy_gain"] == pytest.approx(r["accuracy"] - champion["accuracy"])
        # the gate decided on the validation split, which has its own paired gain
        assert r["validation_paired_items"] == config.benchmark.validation_size
        assert r["validation_exact_match_gain"] == pytest.approx(
            r["validation_exact_match"] - champion["validation_exact_match"]
        )
        assert "validation exact match" in "; ".join(r["promotion_reasons"])


def test_no_evaluation_item_was_ever_a_training_prompt(run):
    """Validation, test and every round's training prompts are disjoint, in any form (a commuted sum
    is the same item), and no round trains on a prompt an earlier round trained on."""
    from flywheel.models.tasks.decontam import normal_forms
    from flywheel.storage import catalog

    ws, config, result = run
    rows = catalog.query(ws, "SELECT round, split, prompt, metadata FROM prompts").to_pylist()

    def forms(split, round_=None):
        return [
            f
            for r in rows
            if r["split"] == split and round_ in (None, r["round"])
            for f in normal_forms(r["prompt"], json.loads(r["metadata"] or "{}"))
            if not f.startswith("text:")
        ]

    test, validation = forms("test"), forms("validation")
    assert (len(set(test)), len(set(validation))) == (config.benchmark.size, config.benchmark.validation_size)
    assert not set(test) & set(validation)
    seen: set[str] = set()
    for k in (1, 2):
        train = forms("train", k)
        assert len(train) == len(set(train)) == config.task.prompts_per_round
        assert not set(train) & (set(test) | set(validation)), f"round {k} trained on an evaluation item"
        assert not set(train) & seen, f"round {k} trained on a prompt of an earlier round"
        seen |= set(train)
    # the data card says what the checks removed
    card = (ws / "runs" / result["run_id"] / "round=2" / "data_card.md").read_text()
    assert "## Overlap checks" in card and "| trained on in an earlier round (fresh prompts each round) |" in card


def test_guard_suites_are_on_by_default_and_the_chosen_side_is_correct(run):
    from flywheel.storage import catalog

    ws, _config, result = run
    suites = {r["suite"] for r in catalog.query(ws, "SELECT DISTINCT suite FROM benchmarks").to_pylist()}
    assert {"guard:basic_arithmetic", "guard:letter_counting"} <= suites
    for r in result["rounds"][1:]:
        assert {"guard_accuracy.basic_arithmetic", "guard_accuracy.letter_counting"} <= set(r)
        if r["pairs"]:
            assert r["pairs_chosen_exact_share"] == 1.0  # a verifier is in the loop: chosen is exactly correct
    wrong = catalog.query(
        ws,
        """SELECT count(*) AS n FROM pairs p JOIN judgments j ON j.candidate_id = p.chosen_id
                                 AND j.source = 'verifier' WHERE j.score < 1""",
    ).to_pylist()
    assert wrong == [{"n": 0}]


def test_transfer_suites_are_scored_every_round_and_never_trained_on(run):
    import mlflow

    from flywheel.storage import catalog

    ws, _config, result = run
    items = catalog.query(ws, "SELECT prompt_id, prompt FROM prompts WHERE split = 'transfer:three_terms'").to_pylist()
    assert len(items) == 8 and all(r["prompt"].count("+") + r["prompt"].count("-") >= 2 for r in items)
    rows = catalog.query(
        ws, "SELECT round, item_id, score FROM benchmarks WHERE suite = 'transfer:three_terms' ORDER BY round"
    ).to_pylist()
    assert sorted({r["round"] for r in rows}) == [0, 1, 2]
    assert all(
        sorted(r["item_id"] for r in rows if r["round"] == k) == sorted(i["prompt_id"] for i in items)
        for k in (0, 1, 2)
    )
    for r in result["rounds"]:
        scored = [x["score"] for x in rows if x["round"] == r["round"]]
        assert r["transfer_exact_match.three_terms"] == sum(s >= 1.0 for s in scored) / len(scored)
    train = catalog.query(ws, "SELECT prompt_id FROM prompts WHERE split = 'train'").to_pylist()
    assert not {r["prompt_id"] for r in train} & {i["prompt_id"] for i in items}
    # in each round's MLflow run, and as a line over rounds in the run's parent (round 0 has only that)
    client = mlflow.MlflowClient()
    key = "transfer_exact_match.three_terms"
    for r in catalog.query(ws, "SELECT round, mlflow_run_id FROM rounds WHERE round > 0").to_pylist():
        assert client.get_run(r["mlflow_run_id"]).data.metrics[key] == result["rounds"][r["round"]][key]
    line = client.get_metric_history(result["mlflow_run_id"], key)
    assert sorted((m.step, m.value) for m in line) == [(r["round"], r[key]) for r in result["rounds"]]
