"""Read-only commands import only what they use (no torch, transformers, prefect or mlflow), and
no library warning reaches the user's terminal. Their speed is measured in benchmarks/cli_startup.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(script):
    return script("benchmarks/cli_startup.py")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, bench):
    return bench.synthetic_workspace(tmp_path_factory.mktemp("ws"))


@pytest.mark.parametrize("name", ["--help", "sql", "runs", "data show", "compare"])
def test_read_only_commands_import_no_heavy_library(workspace, bench, name):
    argv = [a.replace("{ws}", str(workspace)) for a in bench.COMMANDS[name]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    p = subprocess.run(
        [sys.executable, "-W", "always", "-c", bench._PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    report = json.loads(p.stderr.strip().splitlines()[-1])
    assert report["rc"] in (0, None), p.stderr
    assert report["heavy"] == [], f"{name} imported {report['heavy']}"
    # even with every warning switched on for the interpreter, the command keeps them off the terminal
    assert "Warning" not in p.stderr and "warn(" not in p.stderr, p.stderr


def test_data_show_reads_the_rows_and_warns_about_nothing(workspace):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "flywheel.flows.cli",
            "data",
            "show",
            "pairs",
            "--round",
            "2",
            "--limit",
            "2",
            "--workspace",
            str(workspace),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "pairs of run 20260101-000000-abcdef, round 2: 64 row(s), showing 2" in p.stderr
    assert "What is 0 + 1?" in p.stderr and "Warning" not in p.stderr
