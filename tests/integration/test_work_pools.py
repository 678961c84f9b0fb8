"""Stages on Prefect work pools, for real, on loopback: PostgreSQL; a Prefect server on it; an MLflow
tracking server on it with proxied artifacts; two process work pools, "cpu" and "gpu", each with
its own worker. The round flow runs on the cpu pool; its generate and train stages run as flow
runs of the stage deployment flywheel-stage/gpu on the gpu pool. Midway through training the gpu
worker and everything it started are killed with SIGKILL (a lost node) and a new worker is started:
the server's zombie automation marks the orphaned stage run Crashed, the round retries the stage on
the new worker, training resumes from its last complete checkpoint, and the round finishes with
every table complete and nothing duplicated.

The automation is configs/prefect/crash-zombie-flows.yaml with its 90 s window shortened to 60 s.

It is also the scheduling test: the deployments are prefect.yaml's own (`prefect deploy --name
next-round`, `--name gpu`), a triggered run of flywheel-next-round is picked up by a process worker,
and the round lands in the workspace's tables and in MLflow as a scheduled one would."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
PROMPTS, SAMPLES, BENCH = 12, 4, 16
CONFIG = f"""
name: pooled
task: {{prompts_per_round: {PROMPTS}}}
sampling: {{n: {SAMPLES}}}
benchmark: {{size: {BENCH}, validation_size: 8, guards: [], max_new_tokens: 24}}
train: {{dpo: {{num_train_epochs: 4, per_device_train_batch_size: 2}}}}
# the round's model becomes the champion whatever it scores: the alias must reach the server
promotion: {{min_improvement: -1.0, max_length_growth: null}}
stages:
  retry_delay_s: 1
  checkpoint_steps: 1
  generate: {{work_pool: gpu}}
  train: {{work_pool: gpu}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_tool(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        pytest.fail(f"PostgreSQL's {name} is not installed (.ci/run installs PostgreSQL: apt-get install postgresql)")
    return found[-1]


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its server tools as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def wait_for(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on loopback in a throwaway data directory, with databases for Prefect and MLflow."""
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
    data = tmp / "data"
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    port = free_port()
    subprocess.run(
        as_postgres([pg_tool("initdb"), "-D", str(data), "-U", "flywheel", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        as_postgres(
            [
                pg_tool("pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(tmp / "pg.log"),
                "-w",
                "-o",
                f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        for db in ("prefect", "mlflow"):
            subprocess.run(
                [pg_tool("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "flywheel", db],
                check=True,
                capture_output=True,
                timeout=60,
            )
        yield f"flywheel@127.0.0.1:{port}"
    finally:
        subprocess.run(
            as_postgres([pg_tool("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def servers(postgres, tmp_path_factory):
    """Prefect's and MLflow's servers, both on the PostgreSQL server; the environment that reaches them."""
    home = tmp_path_factory.mktemp("servers")
    prefect_port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{postgres}/prefect",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "HF_HUB_OFFLINE": "1",
        # workers: look for work every 2 s; flow runs send a heartbeat every 30 s (the least allowed)
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
    }
    procs = []
    try:
        log = home / "prefect-server.log"
        procs.append(
            subprocess.Popen(
                [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                env=env,
                stdout=open(log, "w"),  # noqa: SIM115 - the server writes it until the fixture stops it
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(f"http://127.0.0.1:{prefect_port}/api/health", procs[-1], log, "Prefect server")
        log = home / "mlflow-server.log"
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--backend-store-uri",
                    f"postgresql://{postgres}/mlflow",
                    "--artifacts-destination",
                    (home / "mlartifacts").as_uri(),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                ],
                env=env,
                stdout=open(log, "w"),  # noqa: SIM115 - the server writes it until the fixture stops it
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", procs[-1], log, "MLflow server")
        yield env, home
    finally:
        for p in reversed(procs):
            stop(p)


def prefect(env, *args, timeout=300):
    p = subprocess.run([*PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"prefect {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def api(env, path: str, body: dict | None = None):
    req = urllib.request.Request(
        env["PREFECT_API_URL"] + path,
        method="POST" if body is not None else "GET",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def worker(env, pool: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*PREFECT, "worker", "start", "--pool", pool, "--type", "process"],
        env=env,
        cwd=ROOT,
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
    )


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL a worker and every process it started, at once: what a lost node looks like."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    return len(pids)


# The shipped automation declares a flow run dead 90 s after its last heartbeat (every 30 s); the
# test waits 60 s instead: still two heartbeats of slack, and 30 s less of CI spent waiting.
ZOMBIE_WINDOW_S = 60


def shorter_zombie_window(tmp_path: Path, within: int) -> Path:
    """configs/prefect/crash-zombie-flows.yaml as shipped, but for its window."""
    import yaml

    automation = yaml.safe_load((ROOT / "configs/prefect/crash-zombie-flows.yaml").read_text())
    assert automation["trigger"]["within"] == 90 and "90 s" in automation["actions"][0]["message"]
    automation["trigger"]["within"] = within
    automation["actions"][0]["message"] = automation["actions"][0]["message"].replace("90 s", f"{within} s")
    out = tmp_path / "crash-zombie-flows.yaml"
    out.write_text(yaml.safe_dump(automation, sort_keys=False))
    return out


def test_stages_on_a_gpu_pool_survive_a_killed_worker(servers, tmp_path):
    import mlflow

    from flywheel.storage import catalog

    env, home = servers
    ws, cfg = tmp_path / "ws", tmp_path / "pooled.yaml"
    cfg.write_text(CONFIG)
    for pool in ("cpu", "gpu"):
        prefect(env, "work-pool", "create", pool, "--type", "process")
    prefect(env, "automation", "create", "--from-file", str(shorter_zombie_window(tmp_path, ZOMBIE_WINDOW_S)))
    # the round flow on the cpu pool; the gpu pool's stage deployment exactly as prefect.yaml has it
    prefect(
        env,
        "--no-prompt",
        "deploy",
        "--prefect-file",
        str(ROOT / "prefect.yaml"),
        "--name",
        "next-round",
        "--pool",
        "cpu",
        "--params",
        json.dumps({"workspace": str(ws), "config_file": str(cfg)}),
    )
    prefect(env, "--no-prompt", "deploy", "--prefect-file", str(ROOT / "prefect.yaml"), "--name", "gpu")
    logs = {p: home / f"worker-{p}.log" for p in ("cpu", "gpu", "gpu-restarted")}
    workers = {"cpu": worker(env, "cpu", logs["cpu"]), "gpu": worker(env, "gpu", logs["gpu"])}
    try:
        run = prefect(env, "deployment", "run", "flywheel-next-round/next-round")
        round_run = next(line.split()[-1] for line in run.splitlines() if "UUID" in line)

        # SIGKILL the gpu worker and its stage run once training has written a complete checkpoint
        deadline = time.time() + 1500
        pattern = str(
            ws / "checkpoints" / "run_id=*" / ".round=1.work" / "trainer" / "checkpoint-*" / "trainer_state.json"
        )
        while not glob.glob(pattern):
            assert time.time() < deadline, "training never wrote a checkpoint:\n" + logs["gpu"].read_text()[-3000:]
            assert workers["gpu"].poll() is None, logs["gpu"].read_text()[-3000:]
            time.sleep(0.5)
        killed, killed_at = kill_tree(workers["gpu"]), time.time()
        workers["gpu"] = worker(env, "gpu", logs["gpu-restarted"])

        while (state := api(env, f"/flow_runs/{round_run}")["state_type"]) not in ("COMPLETED", "FAILED", "CRASHED"):
            assert time.time() < deadline, f"the round is still {state}:\n" + logs["cpu"].read_text()[-3000:]
            time.sleep(3)
        assert state == "COMPLETED", logs["cpu"].read_text()[-5000:]
        finished_at = time.time()
    finally:
        for w in workers.values():
            kill_tree(w) if w.poll() is None else None
    assert killed >= 2, "the gpu worker had no stage run to lose"

    # Prefect: the round ran on the cpu pool, generate and train on the gpu pool; the killed train
    # run was marked Crashed by the automation and retried to completion on the new worker.
    assert api(env, f"/flow_runs/{round_run}")["work_pool_name"] == "cpu"
    stage_dep = api(env, "/deployments/name/flywheel-stage/gpu")
    assert stage_dep["work_pool_name"] == "gpu"
    runs = api(env, "/flow_runs/filter", {"deployments": {"id": {"any_": [stage_dep["id"]]}}, "sort": "START_TIME_ASC"})
    by_stage = {}
    for r in runs:
        assert r["work_pool_name"] == "gpu", r
        by_stage.setdefault(r["parameters"]["stage"], []).append(r["state_type"])
    assert by_stage == {"generate": ["COMPLETED"], "train": ["CRASHED", "COMPLETED"]}, by_stage
    assert "[train] resuming from checkpoint-" in logs["gpu-restarted"].read_text()
    from datetime import datetime

    crashed = next(r for r in runs if r["state_type"] == "CRASHED")
    crashed_at = datetime.fromisoformat(crashed["state"]["timestamp"]).timestamp()
    print(
        f"\nkilled the gpu worker and {killed - 1} process(es) it started; the stage run was marked Crashed "
        f"{crashed_at - killed_at:.0f} s later; the round finished {finished_at - killed_at:.0f} s after the kill"
    )

    # the workspace: every table whole, nothing twice
    def one(sql):
        return catalog.query(ws, sql).to_pylist()

    assert one("SELECT round, status FROM rounds ORDER BY round") == [
        {"round": 0, "status": "completed"},
        {"round": 1, "status": "completed"},
    ]
    assert one("SELECT count(*) AS n, count(DISTINCT candidate_id) AS d FROM candidates") == [
        {"n": PROMPTS * SAMPLES, "d": PROMPTS * SAMPLES}
    ]
    assert one("SELECT count(DISTINCT prompt_id) AS n FROM candidates") == [{"n": PROMPTS}]
    judged = one("SELECT count(*) AS n, count(DISTINCT (candidate_id, source)) AS d FROM judgments")[0]
    assert judged["n"] == judged["d"] >= PROMPTS * SAMPLES
    pairs = one("SELECT count(*) AS n, count(DISTINCT pair_id) AS d FROM pairs")[0]
    assert pairs["n"] == pairs["d"] > 0
    # each split's rows are its items, each once per round
    from flywheel.config import load_config
    from flywheel.models.tasks.splits import eval_items, make_source

    config = load_config(cfg)
    splits = eval_items(make_source(config.task), config.benchmark.validation_size, config.benchmark.size, config.seed)
    for k in (0, 1):
        for name, items in zip(("validation", "test"), splits):
            rows = one(f"SELECT item_id FROM benchmarks WHERE round = {k} AND suite LIKE '%-{name}' ORDER BY item_id")
            assert [r["item_id"] for r in rows] == sorted(it.id for it in items)

    # MLflow, on its server: the round's run with the loss the remote training logged, and the
    # registered model whose champion alias is this round's version
    # a client of its own: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI for every later
    # test in this process, pointing them at a server this module stops
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("pooled")
    rounds = {
        r.data.tags.get("flywheel.round"): r
        for r in client.search_runs([exp.experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    }
    assert set(rounds) == {"1"} and rounds["1"].info.status == "FINISHED"
    assert rounds["1"].data.params["train.world_size"] == "1"
    assert client.get_metric_history(rounds["1"].info.run_id, "loss")
    champion = client.get_model_version_by_alias("pooled", "champion")
    assert champion.run_id == rounds["1"].info.run_id


@pytest.mark.parametrize(
    "pool, message",
    [
        ("nowhere", "stages.judge.work_pool: no work pool 'nowhere' on the Prefect server http://127.0.0.1:"),
        # the pool exists (the test above made it) but nothing deployed the stage flow to it
        (
            "cpu",
            "stages.judge.work_pool: work pool 'cpu' has no stage deployment flywheel-stage/cpu; create it with "
            "`prefect deploy --name cpu`",
        ),
    ],
)
def test_a_stage_on_a_pool_that_cannot_take_it_fails_before_any_work(servers, tmp_path, pool, message):
    env, _ = servers
    prefect(env, "work-pool", "create", "cpu", "--type", "process", "--overwrite")
    ws, cfg = tmp_path / "ws", tmp_path / "c.yaml"
    cfg.write_text(f"stages:\n  judge: {{work_pool: {pool}}}\n")
    p = subprocess.run(
        [sys.executable, "-m", "flywheel.flows.cli", "run", "--config", str(cfg), "--workspace", str(ws)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("flywheel: error:")]
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr and not ws.exists()
