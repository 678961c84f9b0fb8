"""ruff's lint and its format check pass over the repository (pyproject.toml's [tool.ruff] rule set),
so `pytest` alone catches what `scripts/dev.py test` checks before it. mypy runs in dev.py only: a
cold run takes a minute or two, too long to repeat in every test run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff_passes(args):
    out = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"ruff {' '.join(args)}:\n{out.stdout}{out.stderr}"
