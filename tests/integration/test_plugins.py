"""A third-party package extends flywheel through its entry points alone: the example package
(examples/flywheel-example-plugins) is installed, and one real round runs on its task with its
reward source deciding the pairs. It is installed into a folder of its own that only the round's
process has on its path: the shared environment (other tests' processes, a user's venv) never
sees it."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flywheel-example-plugins"

CONFIG = """
name: plugins
rounds: 1
task: {name: tiny_arithmetic, options: {max: 20}, prompts_per_round: 8}
sampling: {n: 4, batch_size: 8}
judge: {sources: [verifier, contains_answer]}
curation: {reward: contains_answer}
benchmark: {size: 16, validation_size: 8, guards: [], batch_size: 8, max_new_tokens: 24}
train: {dpo: {num_train_epochs: 1, per_device_train_batch_size: 1}}
"""


def _install_example(target: Path) -> None:
    """The example package, built and installed as pip installs any package, into `target`."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
    )


def _table(ws: Path, name: str) -> list[dict]:
    return [
        r
        for f in sorted((ws / "tables" / name).glob("run_id=*/round=*/*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    _install_example(root / "site")
    (root / "c.yaml").write_text(CONFIG)
    ws = root / "ws"
    path = os.pathsep.join(p for p in (str(root / "site"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "WARNING", "PYTHONPATH": path}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "flywheel.flows.cli", "run", "--config", str(root / "c.yaml"), "--workspace", str(ws)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ws


def test_the_prompts_come_from_the_plugin_task(run):
    train = [p for p in _table(run, "prompts") if p["split"] == "train"]
    assert len(train) == 8
    assert all(p["task"] == "tiny_arithmetic" and p["prompt"].startswith("What is ") for p in train)


def test_the_plugin_reward_judged_every_candidate_and_decided_the_pairs(run):
    judgments = _table(run, "judgments")
    candidates = _table(run, "candidates")
    mine = [j for j in judgments if j["source"] == "contains_answer"]
    assert len(mine) == len(candidates) > 0
    assert {j["score"] for j in mine} <= {0.0, 1.0} and all(j["parse_ok"] for j in mine)
    assert {h["source"] for h in _table(run, "judge_health")} == {"verifier", "contains_answer"}
    for p in _table(run, "pairs"):
        assert p["chosen_score"] > p["rejected_score"]
