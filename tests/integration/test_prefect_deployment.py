"""Scheduling for real: a Prefect server on loopback, a process work pool, the deployments of
prefect.yaml, a triggered run of `next-round`, and a worker that executes it."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
SMALL = """
name: scheduled
task: {prompts_per_round: 8}
sampling: {n: 4}
benchmark: {size: 16, validation_size: 8, guards: [], max_new_tokens: 24}
train: {dpo: {num_train_epochs: 1}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"Prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
        time.sleep(1)
    yield env
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def prefect(env, *args, timeout=300):
    p = subprocess.run([*PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"prefect {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_deploy_trigger_and_work_a_scheduled_round(server, tmp_path):
    import mlflow

    from flywheel.storage import catalog

    env = server
    ws, cfg = tmp_path / "ws", tmp_path / "small.yaml"
    cfg.write_text(SMALL)
    prefect(env, "work-pool", "create", "test-pool", "--type", "process")
    params = json.dumps({"workspace": str(ws), "config_file": str(cfg)})
    prefect(env, "--no-prompt", "deploy", "--prefect-file", str(ROOT / "prefect.yaml"), "--name", "next-round",
            "--pool", "test-pool", "--params", params)
    run = prefect(env, "deployment", "run", "flywheel-next-round/next-round")
    flow_run_id = next(line.split()[-1] for line in run.splitlines() if "UUID" in line)
    # the worker picks the run up, executes it in a subprocess, and exits
    prefect(env, "worker", "start", "--pool", "test-pool", "--run-once", "--type", "process", timeout=1200)
    state = prefect(env, "flow-run", "inspect", flow_run_id)
    assert "COMPLETED" in state, state[-3000:]
    rounds = catalog.query(ws, "SELECT round, status FROM rounds ORDER BY round").to_pylist()
    assert rounds == [{"round": 0, "status": "completed"}, {"round": 1, "status": "completed"}]
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("scheduled")
    rounds_in_mlflow = [r.data.tags.get("flywheel.round") for r in client.search_runs([exp.experiment_id])
                        if "mlflow.parentRunId" in r.data.tags]
    assert rounds_in_mlflow == ["1"]
