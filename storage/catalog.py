"""The DuckDB catalog: one file in the workspace with a view per table over every run, and the
read-only SQL that `flywheel sql`, `data show`, `runs` and `export` answer with.

Views point at the Parquet files by absolute glob, so the `duckdb` CLI can open the catalog
from anywhere. A table with no file yet gets an empty view with the declared columns, so a
query over it answers with zero rows instead of failing.

Readers and the run never share a lock. The run publishes the catalog by building it under a
temporary name and renaming it over the old one: a reader that holds the old file open (even
`duckdb -readonly` for hours) keeps its inode, and a reader that opens it later gets the new one,
whole. flywheel's own readers open it read-only and lock it down with DuckDB's own settings first.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa

from flywheel.errors import ReadOnlyError
from flywheel.storage.schemas import TABLES

CATALOG_FILE = "catalog.duckdb"
log = logging.getLogger(__name__)

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


def tables_dir(root: Path) -> Path:
    return Path(root).resolve() / "tables"


def view_sql(root: Path, table: str) -> str:
    glob = tables_dir(root) / table / "*" / "*" / "*.parquet"
    if any((Path(root) / "tables" / table).glob("*/*/*.parquet")):
        return (
            f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet({sql_str(str(glob))}, "
            "union_by_name = true, hive_partitioning = false)"
        )
    cols = ", ".join(f"CAST(NULL AS {_DUCK_TYPES[f.type]}) AS {f.name}" for f in TABLES[table])
    return f"CREATE OR REPLACE VIEW {table} AS SELECT {cols} WHERE false"


def build(root: Path, target: Path) -> None:
    """Write a catalog file with every table's view to `target`."""
    with duckdb.connect(str(target)) as con:
        for table in TABLES:
            con.execute(view_sql(root, table))


def refresh(root: Path) -> Path | None:
    """Publish the catalog: built aside, fsynced, renamed over the old one. Best-effort: the
    catalog is for readers, so a failure to publish it is logged and never fails the run (the
    tables themselves are already written); the next publish repairs it."""
    path = catalog_path(root)
    tmp = path.with_name(f".{CATALOG_FILE}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        build(root, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path
    except (OSError, duckdb.Error) as e:
        log.warning("catalog %s not refreshed (the tables are intact): %s", path, str(e).splitlines()[0])
        return None
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)


# DuckDB's own guards, applied in this order (allowed_directories can only be set while external
# access is still on; the lock comes last and makes every SET/RESET/PRAGMA after it fail). Spilling
# is off: it would write a temporary directory in the working directory.
def _guards(root: Path) -> list[str]:
    return [
        f"SET allowed_directories = [{sql_str(str(tables_dir(root)) + os.sep)}]",
        "SET temp_directory = ''",
        "SET enable_external_access = false",
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET lock_configuration = true",
    ]


def connect(root: Path) -> duckdb.DuckDBPyConnection:
    """The catalog, opened read-only and locked down: it reads the workspace's tables and nothing
    else, writes nowhere, installs and loads nothing, and its settings cannot be changed back."""
    path = catalog_path(root)
    if not path.is_file():
        raise FileNotFoundError(f"no catalog at {path}: run `flywheel run` first (or check --workspace)")
    con = duckdb.connect(str(path), read_only=True)
    try:
        for statement in _guards(root):
            con.execute(statement)
    except BaseException:
        con.close()
        raise
    return con


_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\([^)]*\)\s*)?", re.IGNORECASE)


def statement_kind(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The type of the one statement in `sql`; for EXPLAIN, the type of what it explains (EXPLAIN
    ANALYZE runs its statement: `EXPLAIN ANALYZE COPY … TO` writes)."""
    statements = con.extract_statements(sql)
    if len(statements) != 1:
        raise ReadOnlyError(f"expected one SQL statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind == "EXPLAIN":
        inner = _EXPLAIN.sub("", statements[0].query, count=1)
        return "EXPLAIN " + statement_kind(con, inner) if inner != statements[0].query else "EXPLAIN ?"
    return kind


def query(root: Path, sql: str) -> pa.Table:
    """One read-only statement (a SELECT, or an EXPLAIN of one) against the workspace's tables.
    The statement filter names what is refused; DuckDB's settings hold even if it let one by."""
    with connect(root) as con:
        kind = statement_kind(con, sql)
        if kind.endswith("MULTI"):
            # DuckDB plans a PIVOT without an IN list as two statements: one to find its columns.
            raise ReadOnlyError(
                "the catalog is read-only: one SELECT only, and a PIVOT whose columns are not listed runs "
                "two; list them, as in PIVOT … ON round IN (0, 1, 2)"
            )
        if kind not in ("SELECT", "EXPLAIN SELECT"):
            raise ReadOnlyError(
                f"the catalog is read-only: {kind} statements are refused (SELECT and EXPLAIN SELECT only)"
            )
        rel = con.sql(sql)
        return rel.to_arrow_table() if rel is not None else pa.table({})
