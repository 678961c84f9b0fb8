"""Checks a finished run's workspace must pass, whatever engine or config made it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


def assert_every_table_matches_its_schema(ws: Path, run_id: str) -> None:
    """Every table has files for the run, each with exactly its pyarrow schema, and no temporary file
    was left behind."""
    from flywheel.storage.schemas import TABLES

    for name, schema in TABLES.items():
        files = sorted((ws / "tables" / name).glob(f"run_id={run_id}/round=*/*.parquet"))
        assert files, f"no {name} files"
        for f in files:
            assert pq.read_schema(f).equals(schema), f
    assert not list(ws.rglob("*.tmp")), "a temporary file was left behind"


def small_round(name: str, ws: Path, rounds: int, **more: Any) -> dict[str, Any]:
    """Overrides for a real round small enough for CI: 8 prompts × 4 samples, 16 test and 8 validation
    items, the default guard suites at 8 items, one DPO epoch; `more` merged on top."""
    from flywheel.config import BenchmarkConfig, deep_merge

    return deep_merge(
        {
            "name": name,
            "rounds": rounds,
            "workspace": str(ws),
            "task": {"prompts_per_round": 8},
            "sampling": {"n": 4, "max_new_tokens": 32},
            "judge": {"batch_size": 16},
            "benchmark": {
                "size": 16,
                "validation_size": 8,
                "max_new_tokens": 32,
                "guards": [dict(g.model_dump(), size=8) for g in BenchmarkConfig().guards],
            },
            "train": {"dpo": {"num_train_epochs": 1, "learning_rate": 1e-4}},
        },
        more,
    )
