"""The DuckDB catalog: one file in the workspace with a view per table over every run.

Views point at the Parquet files by absolute glob, so the `duckdb` CLI can open the catalog
from anywhere. A table with no file yet gets an empty view with the declared columns, so a
query over it answers with zero rows instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from flywheel.errors import ReadOnlyError
from flywheel.storage.schemas import TABLES

CATALOG_FILE = "catalog.duckdb"

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
}


def catalog_path(root: Path) -> Path:
    return Path(root) / CATALOG_FILE


def sql_str(s: str) -> str:
    """A SQL string literal (DuckDB cannot bind a table function's path as a parameter in a view)."""
    return "'" + s.replace("'", "''") + "'"


def view_sql(root: Path, table: str) -> str:
    glob = Path(root).resolve() / "tables" / table / "*" / "*" / "*.parquet"
    if any((Path(root) / "tables" / table).glob("*/*/*.parquet")):
        return (f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet({sql_str(str(glob))}, "
                "union_by_name = true, hive_partitioning = false)")
    cols = ", ".join(f"CAST(NULL AS {_DUCK_TYPES[f.type]}) AS {f.name}" for f in TABLES[table])
    return f"CREATE OR REPLACE VIEW {table} AS SELECT {cols} WHERE false"


def refresh(root: Path) -> Path:
    """(Re)create every view. Cheap: views hold a glob, not data."""
    path = catalog_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(path)) as con:
        for table in TABLES:
            con.execute(view_sql(root, table))
    return path


def connect(root: Path, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    path = catalog_path(root)
    if not path.is_file():
        raise FileNotFoundError(f"no catalog at {path}: run `flywheel run` first (or check --workspace)")
    return duckdb.connect(str(path), read_only=read_only)




# Statements that only read. Everything else (DELETE, COPY … TO, ATTACH, INSTALL, SET, CREATE …)
# is refused before it runs, even though the connection is read-only too: COPY and ATTACH
# could otherwise still write files outside the catalog.
_READING = {"SELECT", "EXPLAIN"}


def query(root: Path, sql: str) -> pa.Table:
    """One read-only statement against the catalog."""
    with connect(root) as con:
        statements = con.extract_statements(sql)
        if len(statements) != 1:
            raise ReadOnlyError(f"expected one SQL statement, got {len(statements)}")
        kind = statements[0].type.name
        if kind not in _READING:
            raise ReadOnlyError(f"the catalog is read-only: {kind} statements are refused (SELECT and EXPLAIN only)")
        rel = con.sql(sql)
        return rel.to_arrow_table() if rel is not None else pa.table({})
