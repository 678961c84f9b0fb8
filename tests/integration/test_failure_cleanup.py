"""A round that fails ends its MLflow runs FAILED and reports its own error, even when every step
of the cleanup fails too (injected: the failed round's row cannot be written, the catalog cannot be
published, the round's error tag cannot be set)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

CONFIG = """
name: cleanup
rounds: 1
task: {prompts_per_round: 8}
sampling: {n: 4}
benchmark: {size: 16, validation_size: 8, guards: [], max_new_tokens: 24}
stages: {retries: 0}
"""

# The user's command, with faults injected into the real modules before it runs.
RUN = textwrap.dedent("""
    import sys
    import duckdb
    from flywheel.models.training import trainer
    from flywheel.storage import catalog, parquet, tracking

    def train(*a, **k):
        raise RuntimeError("injected training failure")

    real_write, real_tags = parquet.write_table, tracking.set_tags

    def write_table(root, table, run_id, round_, rows, *a, **k):
        if table == "rounds" and any(r["status"] == "failed" for r in rows):
            raise OSError("injected: the failed round's row cannot be written")
        return real_write(root, table, run_id, round_, rows, *a, **k)

    def build(root, target):
        raise duckdb.IOException("injected: the catalog cannot be published")

    def set_tags(run_id, tags):
        if "flywheel.error" in tags and not set_tags.failed:
            set_tags.failed = True  # the round's error tag (set first) fails; the parent's goes through
            raise ConnectionError("injected: MLflow is unreachable")
        return real_tags(run_id, tags)

    set_tags.failed = False
    trainer.train, parquet.write_table, catalog.build, tracking.set_tags = train, write_table, build, set_tags
    from flywheel.flows.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_failing_round_ends_failed_with_its_own_error_whatever_the_cleanup_meets(tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG)
    ws = tmp_path / "ws"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run(
        [sys.executable, "-c", RUN, "run", "--config", "c.yaml", "--workspace", str(ws)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=1200,
    )
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert "injected training failure" in last, p.stderr[-3000:]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cleanup").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    rounds = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and [r.data.tags["flywheel.round"] for r in rounds] == ["1"]
    assert {r.info.status for r in runs} == {"FAILED"}, "no run is left RUNNING"
    assert "injected training failure" in parent[0].data.tags["flywheel.error"]
    assert "cleanup step failed" in p.stderr  # each failed step is said, not swallowed
