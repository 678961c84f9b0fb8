"""Kill a real `flywheel run` (SIGKILL) during generation, resume it and kill it again during
training, resume it and kill it during benchmarking, then resume it to the end: the final tables
must equal those of an uninterrupted run with the same seed, and MLflow must hold exactly one run
per round, none left RUNNING. (One run killed three times, not three runs killed once: each resume
starts from what the previous kill left, so every kill still has to be recovered exactly.)"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

CONFIG = """
name: resume
rounds: 1
task: {prompts_per_round: 8}
sampling: {n: 4, batch_size: 8}
benchmark: {size: 16, validation_size: 8, guards: [], batch_size: 8, max_new_tokens: 24}
train: {dpo: {num_train_epochs: 2, per_device_train_batch_size: 1}}
stages: {checkpoint_steps: 2}
"""

# What identifies a row, independent of the run id (which differs between two runs).
KEYS = {
    "prompts": ("round", "split", "prompt_id"),
    "candidates": ("round", "prompt_id", "sample_index"),
    "judgments": ("round", "prompt_id", "candidate_id", "source"),
    "pairs": ("round", "prompt_id", "chosen", "rejected"),
    "sft": ("round", "prompt_id", "completion"),
    "benchmarks": ("round", "suite", "item_id"),
    "rounds": ("round", "status"),
    "judge_health": ("round", "source", "metric"),
}
# Columns whose values must match too (deterministic: seeded sampling, exact judges).
# The benchmark's responses and scores too: the resumed model must be the uninterrupted run's model.
VALUES = {
    "candidates": ("response",),
    "judgments": ("score",),
    "pairs": ("margin",),
    "benchmarks": ("response", "score"),
}


def cli(ws: Path, *args: str, kill_at=None, env_extra=None) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "WARNING", **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)  # exported by mlflow.set_tracking_uri in this test process
    # Its own process group, so that the kill takes everything it started (Prefect's temporary
    # API server too), as a crash of the machine would.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flywheel.flows.cli",
            "run",
            "--config",
            str(ws.parent / "c.yaml"),
            "--workspace",
            str(ws),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if kill_at is not None and kill_at("".join(seen), line):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9, "".join(seen)
    return proc.wait(), "".join(seen)


def table(ws: Path, name: str) -> list[dict]:
    files = sorted((ws / "tables" / name).glob("run_id=*/round=*/*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def snapshot(ws: Path) -> dict:
    out = {}
    for name, keys in KEYS.items():
        rows = table(ws, name)
        cids = {}
        if name == "judgments":  # candidate ids embed the run id: compare by sample instead
            cids = {c["candidate_id"]: c["sample_index"] for c in table(ws, "candidates")}
        keyed = [
            tuple(cids.get(r[k], r[k]) if k == "candidate_id" else r[k] for k in keys)
            + tuple(r[v] for v in VALUES.get(name, ()))
            for r in rows
        ]
        # The benchmark suite is drawn with replacement (a small task space repeats questions), so
        # prompts and benchmarks may repeat a key: for them the multiset must equal the reference's.
        if name not in ("prompts", "benchmarks"):
            assert len(keyed) == len(set(keyed)), f"duplicate rows in {name}"
        out[name] = sorted(keyed, key=repr)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    (root / "c.yaml").write_text(CONFIG)
    rc, out = cli(root / "ws")
    assert rc == 0, out
    return snapshot(root / "ws")


# the first progress line well inside round 1's generation (its counts depend on when rows finish)
MID_GENERATION = r"^\[generate\] (?:[4-9]|1\d|2[0-7])/32 "


def _after(marker: str, trigger: str):
    """Kill on the first line matching `trigger` that comes after `marker` appeared."""

    def kill_at(seen: str, line: str) -> bool:
        return marker in seen and re.search(trigger, line) is not None and seen.index(marker) < seen.rindex(line)

    return kill_at


KILLS = [  # (stage, when to kill the next invocation: the first during round 1's generation)
    ("generation", _after("[benchmark] 16/16", MID_GENERATION)),
    ("training", _after("[train]", r"^\[train\] 3/")),
    # the resumed training finishes, and the benchmark of round 1 is killed before its last item
    # (which progress lines appear depends on when rows finish: any count short of 16 will do)
    ("benchmarking", _after("[train]", r"^\[benchmark\] (?:[1-9]|1[0-5])/16 ")),
]


def test_a_run_killed_in_each_stage_resumes_to_the_same_tables(tmp_path, reference):
    import mlflow

    (tmp_path / "c.yaml").write_text(CONFIG)
    ws = tmp_path / "ws"
    run_id, outputs = None, []
    for stage, kill_at in KILLS:
        rc, out = cli(ws, *(("--resume", run_id) if run_id else ()), kill_at=kill_at)
        outputs.append(out)
        assert rc == -9, f"the run was not killed during {stage}:\n{out[-3000:]}"
        run_id = run_id or next((ws / "runs").iterdir()).name
        for f in (ws / "tables").rglob("*.parquet"):  # whatever the kill interrupted, every visible file is whole
            pq.read_table(f)
    rc, out = cli(ws, "--resume", run_id)
    assert rc == 0, out
    # killed at step 3, after the checkpoint of step 2: the next invocation resumed from it
    assert re.search(r"\[train\] resuming from checkpoint-\d+", outputs[2]), outputs[2][-3000:]
    assert snapshot(ws) == reference
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and [r.data.tags["flywheel.round"] for r in children] == ["1"]
    assert {r.info.status for r in runs} == {"FINISHED"}, "no run is left RUNNING or duplicated"
    versions = client.search_model_versions("name = 'resume'")
    assert [v.run_id for v in versions] == [children[0].info.run_id], "one registered version for round 1"


def test_resume_errors(tmp_path, reference):
    (tmp_path / "c.yaml").write_text(CONFIG)
    ws = tmp_path / "ws"
    rc, out = cli(ws, "--resume", "20990101-000000-nope")
    assert rc == 2 and "no run '20990101-000000-nope'" in out
    rc, out = cli(ws, kill_at=_after("[benchmark] 16/16", MID_GENERATION))
    run_id = next((ws / "runs").iterdir()).name
    (tmp_path / "c.yaml").write_text(CONFIG.replace("n: 4", "n: 6"))
    rc, out = cli(ws, "--resume", run_id)
    assert rc == 2 and "sampling.n differ" in out and "--force-from-stage" in out, out[-2000:]
    assert not (ws / "runs" / run_id / "round=1" / "generate.done.json").exists()
    # told where to start over, the run goes on with the new settings; round 0 is kept as it was
    before = (ws / "runs" / run_id / "round=0" / "benchmark.done.json").read_text()
    rc, out = cli(ws, "--resume", run_id, "--force-from-stage", "generate")
    assert rc == 0, out[-3000:]
    assert (ws / "runs" / run_id / "round=0" / "benchmark.done.json").read_text() == before
    per_prompt = {}
    for c in table(ws, "candidates"):
        per_prompt[c["prompt_id"]] = per_prompt.get(c["prompt_id"], 0) + 1
    assert set(per_prompt.values()) == {6}


def test_readers_never_fail_the_run_and_the_run_never_fails_a_reader(tmp_path, reference):
    """The everyday way to inspect data while rounds run: a process holding the catalog open
    read-only for the whole run (as `duckdb -readonly` does), and `flywheel sql` every 0.5 s. Zero
    failures on either side, and the tables equal those of the run without readers."""
    import threading
    import time

    import duckdb

    (tmp_path / "c.yaml").write_text(CONFIG)
    ws = tmp_path / "ws"
    done, failures, answered = threading.Event(), [], []

    def hold_open():
        while not (ws / "catalog.duckdb").is_file() and not done.is_set():
            time.sleep(0.1)
        if done.is_set():
            return
        with duckdb.connect(str(ws / "catalog.duckdb"), read_only=True) as con:
            while not done.is_set():
                con.execute("SELECT count(*) FROM benchmarks").fetchall()
                time.sleep(0.5)

    def query_loop():
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        while not done.is_set():
            if (ws / "catalog.duckdb").is_file():
                p = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "flywheel.flows.cli",
                        "sql",
                        "SELECT count(*) AS n FROM candidates",
                        "--workspace",
                        str(ws),
                        "--format",
                        "csv",
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=120,
                )
                (answered if p.returncode == 0 else failures).append(p.stdout + p.stderr)
            time.sleep(0.5)

    threads = [threading.Thread(target=f, daemon=True) for f in (hold_open, query_loop)]
    for t in threads:
        t.start()
    try:
        rc, out = cli(ws)
    finally:
        done.set()
        for t in threads:
            t.join(120)
    assert rc == 0, out[-3000:]
    assert failures == [], failures[:3]
    assert len(answered) >= 10, f"only {len(answered)} queries answered during the run"
    assert snapshot(ws) == reference


def test_force_from_stage_redoes_the_latest_round_and_keeps_each_rounds_config(tmp_path, reference):
    """On a finished run, --force-from-stage train redoes round 1 from training under the changed
    training settings: generation is kept, what an earlier attempt wrote is cleared, and both
    configs are kept. Settings the splits rest on cannot be forced; nor can a stage without a run."""
    import shutil

    (tmp_path / "c.yaml").write_text(CONFIG)
    ws = tmp_path / "ws"
    rc, out = cli(ws, "--force-from-stage", "train")
    assert rc == 2 and "--resume" in out and not (ws / "runs").exists(), out[-2000:]
    rc, out = cli(ws)
    assert rc == 0, out[-3000:]
    run_id = next((ws / "runs").iterdir()).name
    assert snapshot(ws) == reference
    round1 = ws / "runs" / run_id / "round=1"
    generated = (round1 / "generate.done.json").read_text()
    candidates = sorted((ws / "tables" / "candidates").rglob("*.parquet"))
    kept = {f: f.read_bytes() for f in candidates}
    bench = ws / "tables" / "benchmarks" / f"run_id={run_id}" / "round=1"
    shutil.copy(bench / "data.parquet", bench / "guard-0.parquet")  # a part no current config writes

    (tmp_path / "c.yaml").write_text(CONFIG + "seed: 5\n")
    rc, out = cli(ws, "--resume", run_id, "--force-from-stage", "train")
    assert rc == 2 and "seed" in out and "start a new run" in out, out[-2000:]

    (tmp_path / "c.yaml").write_text(CONFIG.replace("num_train_epochs: 2", "num_train_epochs: 1"))
    rc, out = cli(ws, "--resume", run_id, "--force-from-stage", "train")
    assert rc == 0, out[-3000:]
    assert "round 1 is redone from train" in out
    assert (round1 / "generate.done.json").read_text() != generated, "kept, under the new config's fingerprint"
    assert {f: f.read_bytes() for f in candidates} == kept, "generation is not redone"
    assert not (bench / "guard-0.parquet").exists(), "an earlier attempt's part is cleared"
    assert len(list((ws / "runs" / run_id / "configs").glob("*.yaml"))) == 2
    rows = table(ws, "rounds")
    assert sorted(r["round"] for r in rows) == [0, 1] and rows[-1]["status"] == "completed"
    # a plain resume now matches the forced round: nothing is redone, nothing refused
    rc, out = cli(ws, "--resume", run_id)
    assert rc == 0, out[-3000:]
