"""The read-only SQL of `flywheel sql`: DuckDB's own guards, not only a statement filter, on a real
workspace of Parquet files and a real catalog. And the catalog's publication: a reader holding it
open never blocks the run, and the run never blocks or breaks a reader."""

import contextlib
import io
import multiprocessing
import os
from pathlib import Path

import duckdb
import pytest

from flywheel.flows.cli import main
from flywheel.storage import catalog, parquet

RUN = "20260101-000000-abcdef"


def bench_rows(n: int, round_: int = 0) -> list[dict]:
    return [
        dict(
            run_id=RUN,
            round=round_,
            model="m",
            suite="s",
            item_id=f"i{i}",
            response="1",
            extracted="1",
            score=1.0,
            n_tokens=1,
        )
        for i in range(n)
    ]


@pytest.fixture
def ws(tmp_path):
    ws = tmp_path / "ws"
    parquet.write_table(ws, "benchmarks", RUN, 0, bench_rows(3))
    assert catalog.refresh(ws) is not None
    return ws


def sql(ws: Path, statement: str, cwd: Path) -> tuple[int, str, str]:
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)  # relative paths in a statement resolve here: nothing may appear in it
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["sql", statement, "--workspace", str(ws), "--format", "csv"])
    finally:
        os.chdir(here)
    out.flush()
    return rc, out.buffer.getvalue().decode(), err.getvalue()


def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.txt"
    secret.write_text("a,b\ns3cr3t,1\n")
    return secret


HOSTILE = [
    "EXPLAIN ANALYZE COPY (SELECT 42) TO 'pwned.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 42) TO '{tables}/pwned.csv'",
    "EXPLAIN COPY (SELECT 42) TO 'pwned.csv'",
    "COPY (SELECT 42) TO 'pwned.csv'",
    "COPY (SELECT 42) TO '{tables}/pwned.parquet'",
    "EXPORT DATABASE 'pwned'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "EXPLAIN ANALYZE INSTALL httpfs",
    "ATTACH 'pwned.duckdb' AS p",
    "ATTACH ':memory:' AS m",
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM read_csv('{secret}')",
    "SELECT * FROM read_parquet('{tables}/../../secret.txt')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM 'https://example.invalid/x.parquet'",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "RESET enable_external_access",
    "PRAGMA enable_external_access = true",
    "SET lock_configuration = false",
    "SELECT 1; COPY (SELECT 42) TO 'pwned.csv'",
    "SELECT 1; SELECT 2",
    "CREATE TABLE t AS SELECT 1",
    "DELETE FROM benchmarks",
]


@pytest.mark.parametrize("statement", HOSTILE)
def test_sql_cannot_write_install_attach_or_read_outside(ws, tmp_path, statement):
    secret = outside(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    statement = statement.format(tables=ws / "tables", secret=secret)
    before = {p: p.read_bytes() for p in ws.rglob("*") if p.is_file()}
    rc, out, err = sql(ws, statement, cwd)
    assert rc == 2, (statement, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flywheel: error:"), err
    assert "s3cr3t" not in out + err
    assert not list(cwd.iterdir()), "nothing may be written in the working directory"
    assert {p: p.read_bytes() for p in ws.rglob("*") if p.is_file()} == before, "the workspace is unchanged"


def test_the_guards_hold_behind_the_filter(ws, tmp_path):
    """Past the statement filter, DuckDB itself refuses: the connection the filter guards is
    read-only, touches no file outside the workspace's tables and cannot be unlocked. (Writing a
    file inside tables/ is the one thing left to the filter alone: the case above refuses it.)"""
    secret = outside(tmp_path)
    with catalog.connect(ws) as con:
        assert con.execute("SELECT count(*) FROM benchmarks").fetchone() == (3,)
        for statement in (
            f"SELECT * FROM read_text('{secret}')",
            f"COPY (SELECT 1) TO '{tmp_path}/x.csv'",
            f"ATTACH '{tmp_path}/x.duckdb'",
            "CREATE TABLE t (a INT)",
            "INSTALL httpfs",
            "SET enable_external_access = true",
            "SET lock_configuration = false",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(statement)
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone() == (False,)
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.duckdb").exists()


def test_reading_is_allowed(ws, tmp_path):
    rc, out, err = sql(ws, "SELECT count(*) AS n FROM benchmarks", tmp_path)
    assert (rc, out.split()) == (0, ['"n"', "3"]), err
    rc, out, err = sql(ws, "EXPLAIN SELECT * FROM benchmarks", tmp_path)
    assert rc == 0 and "PARQUET" in out.upper(), err
    rc, out, err = sql(ws, "EXPLAIN ANALYZE SELECT count(*) FROM benchmarks", tmp_path)
    assert rc == 0, err
    # a PIVOT with its columns listed is one SELECT; without them DuckDB runs two, and is told how
    rc, out, err = sql(ws, "PIVOT benchmarks ON round IN (0, 1) USING count(*) GROUP BY suite", tmp_path)
    assert (rc, out.split()) == (0, ['"suite","0","1"', '"s",3,0']), err
    rc, out, err = sql(ws, "PIVOT benchmarks ON round USING count(*) GROUP BY suite", tmp_path)
    assert rc == 2 and "ON round IN (0, 1, 2)" in err and len(err.strip().splitlines()) == 1, err
    # reading the workspace's own table files directly stays possible
    rc, out, err = sql(ws, f"SELECT count(*) AS n FROM read_parquet('{ws}/tables/benchmarks/*/*/*.parquet')", tmp_path)
    assert (rc, out.split()) == (0, ['"n"', "3"]), err


def hold_catalog_open(path: str, ready, stop) -> None:
    con = duckdb.connect(path, read_only=True)
    con.execute("SELECT count(*) FROM benchmarks").fetchall()
    ready.set()
    stop.wait(60)
    con.close()


def test_a_reader_holding_the_catalog_never_blocks_its_publication(ws):
    """A process with the catalog open read-only (as `duckdb -readonly` is) while the run publishes
    it: before, the run's rewrite met the reader's lock and the run died."""
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    reader = ctx.Process(target=hold_catalog_open, args=(str(catalog.catalog_path(ws)), ready, stop))
    reader.start()
    try:
        assert ready.wait(60)
        parquet.write_table(ws, "benchmarks", RUN, 1, bench_rows(2, 1))
        for _ in range(3):
            assert catalog.refresh(ws) == catalog.catalog_path(ws)
        assert catalog.query(ws, "SELECT count(*) AS n FROM benchmarks").to_pylist() == [{"n": 5}]
    finally:
        stop.set()
        reader.join(60)
    assert reader.exitcode == 0
    assert [p.name for p in ws.iterdir() if p.name.startswith(".")] == [], "no temporary catalog left behind"


def test_a_failed_publication_keeps_the_old_catalog_and_does_not_raise(ws, monkeypatch, caplog):
    """A publication that fails midway (a full disk, here injected) leaves the old catalog whole and
    no temporary file, and the run goes on: the tables are what matter, the catalog is for readers."""
    before = catalog.catalog_path(ws).read_bytes()
    real = catalog.build

    def half_then_fail(root, target):
        real(root, target)
        raise duckdb.IOException("No space left on device")

    monkeypatch.setattr(catalog, "build", half_then_fail)
    assert catalog.refresh(ws) is None
    assert "not refreshed" in caplog.text and "No space left" in caplog.text
    assert catalog.catalog_path(ws).read_bytes() == before
    assert [p.name for p in ws.iterdir() if p.name.startswith(".")] == []
