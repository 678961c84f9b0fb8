#!/usr/bin/env python3
"""Whether two workspaces hold the same tables: every table's rows compared, leaving out the columns
that name the run (its id, the ids hashed from it, checkpoint paths, times, MLflow ids, versions).
How a refactor shows it changed nothing: run the same config on the old and the new code, then

    .venv/bin/python scripts/same_tables.py WORKSPACE_OLD WORKSPACE_NEW

Prints one line a table; exits 1 when any differs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import duckdb

RUN_SPECIFIC = re.compile(
    r"run_id|candidate_id|pair_id|chosen_id|rejected_id|^model$|^policy|_at$|mlflow|version|registered"
)


def main(old: str, new: str) -> int:
    a_root, b_root = Path(old) / "tables", Path(new) / "tables"
    con = duckdb.connect()
    differ = 0
    for table in sorted(p.name for p in a_root.iterdir() if p.is_dir()):

        def rows(root: Path, cols: list[str] | None = None, table: str = table):
            src = f"read_parquet('{root}/{table}/**/*.parquet', hive_partitioning=false)"
            if cols is None:
                return [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()]
            listed = ", ".join('"' + c + '"' for c in cols)
            return con.execute(f"SELECT {listed} FROM {src} ORDER BY ALL").fetchall()

        cols = rows(a_root)
        kept = [c for c in cols if not RUN_SPECIFIC.search(c)]
        a, b = rows(a_root, kept), rows(b_root, kept)
        same = a == b
        differ += not same
        print(
            f"{table:<14} {len(a):>6} vs {len(b):>6} rows  {'identical' if same else 'DIFFERENT'}  "
            f"(left out: {', '.join(sorted(set(cols) - set(kept)))})"
        )
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
