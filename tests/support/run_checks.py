"""Checks a finished run's workspace must pass, whatever engine or config made it."""

from __future__ import annotations

from pathlib import Path

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
