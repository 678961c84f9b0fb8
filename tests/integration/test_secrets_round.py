"""One small real round through the CLI with secrets in its environment, one of them the API key of
a served judge that is really sent: afterwards no planted secret is in the workspace (tables,
checkpoints, the MLflow store and its artifacts), in Prefect's home (its database and logs), or in
what the run printed."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from stubs import OneToken, serving

pytestmark = pytest.mark.slow

KEY_ENV = "FLYWHEEL_TEST_KEY"
SECRETS = {
    KEY_ENV: "sk-planted-round-5f1c0ffee0123456",  # the served judge's key (openai.api_key_env)
    "OPENAI_API_KEY": "opaque-planted-openai-98765",  # no known shape
    "HF_TOKEN": "hf_plantedroundtoken0123456789",
}


class Judge(OneToken):
    """The served judge: one verdict token and no log-probs (the judge samples its verdicts), keeping
    each request's Authorization header."""

    seen: ClassVar[list[str]] = []

    def before(self) -> bool:
        Judge.seen.append(self.headers.get("Authorization", ""))
        return False


@pytest.fixture
def judge():
    Judge.seen = []
    with serving(Judge) as port:
        yield f"http://127.0.0.1:{port}/v1"


def holders(root: Path, secrets) -> list[str]:
    """Files under `root` holding any of `secrets`, read in chunks (checkpoints are hundreds of MiB)."""
    needles = [s.encode() for s in secrets]
    overlap = max(len(n) for n in needles)
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        with open(path, "rb") as f:
            tail = b""
            while chunk := f.read(1 << 24):
                window = tail + chunk
                if any(n in window for n in needles):
                    found.append(str(path.relative_to(root)))
                    break
                tail = window[-overlap:]
    return found


def test_a_round_persists_and_prints_no_secret_from_its_environment(tmp_path, judge):
    from flywheel.config import EMBEDDED_MODEL
    from flywheel.storage import catalog

    ws, prefect_home = tmp_path / "ws", tmp_path / "prefect"
    (tmp_path / "c.yaml").write_text(
        json.dumps(
            {
                "name": "secrets",
                "rounds": 1,
                "task": {"prompts_per_round": 8},
                "sampling": {"n": 4, "max_new_tokens": 24},
                "benchmark": {"size": 16, "validation_size": 8, "guards": [], "max_new_tokens": 24},
                "judge": {
                    "sources": [
                        "verifier",
                        {
                            "type": "llm_judge",
                            "name": "served",
                            "model": {
                                "name": "judge",
                                "engine": "openai",
                                "openai": {
                                    "base_url": judge,
                                    "tokenizer": EMBEDDED_MODEL,
                                    "api_key_env": KEY_ENV,
                                    "verdict_samples": 1,
                                },
                            },
                        },
                    ],
                    "subset": "all",
                },  # every candidate goes to the served judge, with the key
                "train": {"dpo": {"num_train_epochs": 1}},
            }
        )
    )
    env = {**os.environ, **SECRETS, "HF_HUB_OFFLINE": "1", "PREFECT_API_URL": "", "PREFECT_HOME": str(prefect_home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    flywheel_bin = Path(sys.executable).with_name("flywheel")
    p = subprocess.run(
        [str(flywheel_bin), "run", "--config", "c.yaml", "--workspace", str(ws), "--verbose"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=1200,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert Judge.seen and set(Judge.seen) == {f"Bearer {SECRETS[KEY_ENV]}"}, "the key was sent, so it was live"
    rounds = catalog.query(ws, "SELECT round, registered_version FROM rounds ORDER BY round").to_pylist()
    assert [(r["round"], r["registered_version"]) for r in rounds] == [(0, None), (1, "1")], "trained, registered"

    secrets = list(SECRETS.values())
    printed = p.stdout + p.stderr
    assert not [s for s in secrets if s in printed]
    assert (ws / "mlflow.db").is_file() and list((ws / "mlartifacts").rglob("MLmodel"))
    assert (prefect_home / "prefect.db").is_file() or list(prefect_home.rglob("*.db")), "Prefect's database is scanned"
    assert not holders(tmp_path, secrets)  # the workspace, Prefect's home, anything written in the cwd
