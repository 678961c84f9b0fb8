"""Atomic Parquet IO over the workspace's hive-partitioned tables.

A stage writes one file per (table, run, round, part). The file is written under a name that
no reader globs (``*.parquet.tmp``), fsynced, then renamed: a reader sees the old file or the
new one, never a partial one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.storage.schemas import TABLES


def partition_dir(root: Path, table: str, run_id: str, round_: int) -> Path:
    return Path(root) / "tables" / table / f"run_id={run_id}" / f"round={round_}"


def table_path(root: Path, table: str, run_id: str, round_: int, part: str = "data") -> Path:
    return partition_dir(root, table, run_id, round_) / f"{part}.parquet"


def to_table(table: str, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows → pa.Table with the declared schema; a missing or mistyped column raises."""
    schema = TABLES[table]
    missing = [f.name for f in schema if any(f.name not in r for r in rows)]
    if missing:
        raise ValueError(f"{table}: rows lack column(s) {missing}")
    return pa.Table.from_pylist([dict(r) for r in rows], schema=schema)


def write_table(
    root: Path, table: str, run_id: str, round_: int, data: pa.Table | Sequence[Mapping[str, Any]], part: str = "data"
) -> Path:
    tbl = data if isinstance(data, pa.Table) else to_table(table, data)
    tbl = tbl.cast(TABLES[table])  # enforce the declared schema (column order, types, nullability)
    final = table_path(root, table, run_id, round_, part)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.{uuid.uuid4().hex}.parquet.tmp")
    try:
        pq.write_table(tbl, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def read_table(root: Path, table: str, run_id: str, round_: int, part: str = "data") -> pa.Table:
    return pq.read_table(table_path(root, table, run_id, round_, part), schema=TABLES[table])


def read_parts(root: Path, table: str, run_id: str, round_: int, pattern: str = "*") -> list[dict]:
    """The rows of every part file of a round's partition whose part name matches `pattern` (a
    glob: "guard-*" for the benchmarks table's guard suites), parts in name order. A file being
    written is never read: its temporary name does not end in .parquet."""
    folder = partition_dir(root, table, run_id, round_)
    return [
        r
        for f in sorted(folder.glob(f"{pattern}.parquet"))
        for r in read_table(root, table, run_id, round_, part=f.stem).to_pylist()
    ]


def remove_parts(root: Path, table: str, run_id: str, round_: int, pattern: str = "*") -> list[Path]:
    """Delete a round's part files of `table` whose part name matches `pattern`: a stage clears what
    an earlier attempt of it wrote before it writes again, so no part of another config survives."""
    gone = sorted(partition_dir(root, table, run_id, round_).glob(f"{pattern}.parquet"))
    for f in gone:
        f.unlink(missing_ok=True)
    return gone


def exists(root: Path, table: str, run_id: str, round_: int, part: str = "data") -> bool:
    return table_path(root, table, run_id, round_, part).is_file()
