"""Stopping when nothing improves, listing and comparing runs, and a failed round, on the real model."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SMALL = """
name: life
task: {prompts_per_round: 8}
sampling: {n: 4}
benchmark: {size: 16, validation_size: 8, guards: [], max_new_tokens: 24}
train: {dpo: {num_train_epochs: 1}}
"""


def cli(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "flywheel.flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=1200,
    )


def test_stop_after_no_improvement_then_runs_and_compare(tmp_path):
    guarded = SMALL.replace(
        "benchmark: {size: 16, validation_size: 8, guards: [], max_new_tokens: 24}",
        "benchmark: {size: 16, validation_size: 8, "
        "max_new_tokens: 24, guards: [{task: basic_arithmetic, size: 8, max_drop: 0.05}]}",
    )
    (tmp_path / "c.yaml").write_text(guarded + "promotion: {min_improvement: 1.0}\n")  # nothing can be promoted
    ws = tmp_path / "ws"
    p = cli(
        tmp_path,
        "run",
        "--config",
        "c.yaml",
        "--workspace",
        str(ws),
        "--max-rounds",
        "3",
        "--until-no-improvement",
        "1",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "stopping: 1 round(s) in a row without a promotion" in p.stderr
    from flywheel.storage import catalog

    rounds = catalog.query(ws, "SELECT round, promoted, promotion_reasons FROM rounds ORDER BY round").to_pylist()
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["promoted"] is False
    assert "needs ≥ +100.0" in rounds[1]["promotion_reasons"]
    # the guard suite was benchmarked for both models, beside the test and validation splits
    suites = catalog.query(ws, "SELECT round, suite, count(*) n FROM benchmarks GROUP BY ALL ORDER BY ALL").to_pylist()
    assert suites == [
        {"round": k, "suite": s, "n": n}
        for k in (0, 1)
        for s, n in (("chain_sum-test", 16), ("chain_sum-validation", 8), ("guard:basic_arithmetic", 8))
    ]
    run_id = next((ws / "runs").iterdir()).name

    p = cli(tmp_path, "runs", "--workspace", str(ws))
    assert p.returncode == 0 and run_id in p.stdout + p.stderr and "completed" in p.stdout + p.stderr

    # a second run to compare with: this one may promote
    (tmp_path / "d.yaml").write_text(SMALL)
    assert cli(tmp_path, "run", "--config", "d.yaml", "--workspace", str(ws), "--rounds", "1").returncode == 0
    other = sorted(d.name for d in (ws / "runs").iterdir() if d.is_dir() and d.name != run_id)[0]
    out = tmp_path / "cmp.png"
    p = cli(tmp_path, "compare", run_id, other, "--workspace", str(ws), "--out", str(out), "--mlflow")
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-3000:]
    assert run_id in text and other in text and "accuracy" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    parents = client.search_runs([client.get_experiment_by_name("life").experiment_id], "tags.`flywheel.kind` = 'run'")
    assert len(parents) == 2
    for parent in parents:
        assert [a.path for a in client.list_artifacts(parent.info.run_id, "compare")] == ["compare/cmp.png"]
    p = cli(tmp_path, "compare", "20990101-nope", "--workspace", str(ws))
    assert p.returncode == 2 and "no run '20990101-nope'" in p.stderr
    # the figures match what the rounds logged to MLflow
    from flywheel.storage import compare

    for row in compare.collect(ws, [run_id, other]):
        if row["round"] == 0:
            continue
        logged = client.search_runs(
            [client.get_experiment_by_name("life").experiment_id],
            f"tags.`flywheel.run_id` = '{row['run']}' AND tags.`flywheel.round` = '{row['round']}'",
        )[0].data.metrics
        assert row["accuracy"] == pytest.approx(logged["accuracy"]) and row["pairs"] == logged["pairs"]


def test_a_stage_past_its_timeout_fails_the_round_visibly(tmp_path):
    (tmp_path / "c.yaml").write_text(SMALL + "stages: {timeout_s: 0.5, retries: 0}\n")
    ws = tmp_path / "ws"
    p = cli(tmp_path, "run", "--config", "c.yaml", "--workspace", str(ws), "--rounds", "1")
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].startswith("flywheel: error:"), p.stderr[-2000:]
    from flywheel.storage import catalog

    assert "ran past its timeout (stages.timeout_s = 0.5 s)" in p.stderr.strip().splitlines()[-1]
    failed = catalog.query(ws, "SELECT round, status, error FROM rounds WHERE status = 'failed'").to_pylist()
    assert len(failed) == 1 and "ran past its timeout" in failed[0]["error"], failed
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("life").experiment_id])
    # the parent always; the round's own run too when the timeout hit round 1 (round 0 has none)
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 1 + (failed[0]["round"] > 0)
    assert all("ran past its timeout" in r.data.tags["flywheel.error"] for r in runs)
