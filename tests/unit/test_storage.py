import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.storage import catalog, parquet
from flywheel.storage.schemas import TABLES


def bench_rows(n, run="r1", rnd=0):
    return [
        dict(
            run_id=run,
            round=rnd,
            model="m",
            suite="s",
            item_id=f"i{k}",
            response="x",
            extracted="1",
            score=float(k % 2),
            n_tokens=3,
        )
        for k in range(n)
    ]


def test_write_is_atomic_and_typed(tmp_path):
    path = parquet.write_table(tmp_path, "benchmarks", "r1", 0, bench_rows(4))
    assert path == tmp_path / "tables/benchmarks/run_id=r1/round=0/data.parquet"
    assert pq.read_schema(path).equals(TABLES["benchmarks"])
    assert not list(path.parent.glob("*.tmp")), "no temporary file may be left behind"


def test_read_parts_reads_the_matching_part_files_of_a_round(tmp_path):
    for part, n in (("data", 2), ("validation", 3), ("guard-0", 4), ("guard-1", 5)):
        parquet.write_table(tmp_path, "benchmarks", "r1", 0, bench_rows(n), part=part)
    parquet.write_table(tmp_path, "benchmarks", "r1", 1, bench_rows(7), part="guard-0")  # another round
    folder = parquet.partition_dir(tmp_path, "benchmarks", "r1", 0)
    (folder / ".guard-2.0123.parquet.tmp").write_bytes(b"half a file")  # a write in progress
    assert len(parquet.read_parts(tmp_path, "benchmarks", "r1", 0, "guard-*")) == 4 + 5
    assert len(parquet.read_parts(tmp_path, "benchmarks", "r1", 0)) == 2 + 3 + 4 + 5
    assert parquet.read_parts(tmp_path, "benchmarks", "r1", 2) == []


def test_missing_column_is_rejected_and_old_file_kept(tmp_path):
    parquet.write_table(tmp_path, "benchmarks", "r1", 0, bench_rows(4))
    bad = bench_rows(2)
    del bad[1]["score"]
    with pytest.raises(ValueError, match="score"):
        parquet.write_table(tmp_path, "benchmarks", "r1", 0, bad)
    assert parquet.read_table(tmp_path, "benchmarks", "r1", 0).num_rows == 4


def test_null_in_required_column_fails_before_rename(tmp_path):
    parquet.write_table(tmp_path, "benchmarks", "r1", 0, bench_rows(3))
    rows = bench_rows(2)
    rows[0]["item_id"] = None
    with pytest.raises((pa.ArrowInvalid, ValueError)):
        parquet.write_table(tmp_path, "benchmarks", "r1", 0, rows)
    assert parquet.read_table(tmp_path, "benchmarks", "r1", 0).num_rows == 3
    assert not list((tmp_path / "tables/benchmarks/run_id=r1/round=0").glob("*.tmp"))


def test_catalog_views_over_all_runs_and_empty_tables(tmp_path):
    parquet.write_table(tmp_path, "benchmarks", "r1", 0, bench_rows(4))
    parquet.write_table(tmp_path, "benchmarks", "r2", 1, bench_rows(6, "r2", 1))
    catalog.refresh(tmp_path)
    got = catalog.query(tmp_path, "SELECT run_id, round, count(*) n FROM benchmarks GROUP BY ALL ORDER BY run_id")
    assert got.to_pylist() == [{"run_id": "r1", "round": 0, "n": 4}, {"run_id": "r2", "round": 1, "n": 6}]
    # a table with no file yet answers with zero rows and its declared columns
    pairs = catalog.query(tmp_path, "SELECT * FROM pairs")
    assert pairs.num_rows == 0 and pairs.column_names == TABLES["pairs"].names
    # the duckdb client opens the same file
    with duckdb.connect(str(catalog.catalog_path(tmp_path)), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM benchmarks").fetchone()[0] == 10


def test_catalog_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no catalog"):
        catalog.query(tmp_path, "SELECT 1")


def test_catalog_is_opened_read_only(tmp_path):
    catalog.refresh(tmp_path)
    with pytest.raises(catalog.ReadOnlyError, match="CREATE statements are refused"):
        catalog.query(tmp_path, "CREATE TABLE x (a INT)")
    # and the connection itself is read-only, behind the statement check
    with catalog.connect(tmp_path) as con, pytest.raises(duckdb.Error):
        con.execute("CREATE TABLE x (a INT)")


def test_two_workspaces_in_one_process_keep_their_own_mlflow_stores(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; our own export must not read as a user override."""
    import mlflow

    from flywheel.storage import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("a", "b"):
        ws = tmp_path / name
        exp_id = tracking.setup(ws, "exp")
        assert mlflow.get_tracking_uri() == f"sqlite:///{ws.resolve() / 'mlflow.db'}"
        exp = mlflow.MlflowClient().get_experiment(exp_id)
        assert exp.artifact_location == (ws.resolve() / "mlartifacts").as_uri()
    # a user's own URI still wins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'user.db'}")
    assert tracking.tracking_uri(tmp_path / "c") == f"sqlite:///{tmp_path / 'user.db'}"


def test_secrets_are_masked_in_params_and_errors():
    from flywheel.storage import tracking

    assert tracking.redact({"cfg.hub_token": "hf_abc", "cfg.api_key": "k", "cfg.rounds": 3}) == {
        "cfg.hub_token": "***",
        "cfg.api_key": "***",
        "cfg.rounds": "3",
    }
    # secrets, not token counts: the sampling and judge limits stay readable in MLflow
    safe = {
        "cfg.sampling.max_new_tokens": 32,
        "cfg.benchmark.max_new_tokens": 48,
        "cfg.judge.max_prompt_tokens": 1024,
        "cfg.tokenizer": "x",
        "cfg.author": "me",
    }
    assert tracking.redact(safe) == {k: str(v) for k, v in safe.items()}
    secret = {"cfg.token": "t", "cfg.db.password": "p", "cfg.aws_secret_access_key": "s", "cfg.credentials": "c"}
    assert set(tracking.redact(secret).values()) == {"***"}
    text = "OperationalError: could not connect to postgresql://me:pa55@db:5432/mlflow and https://u:p@x.org/a"
    masked = tracking.mask_credentials(text)
    assert "pa55" not in masked and "u:p@" not in masked
    assert "postgresql://***@db:5432/mlflow" in masked and "https://***@x.org/a" in masked


def test_a_converted_checkpoint_published_twice_keeps_the_first(tmp_path):
    """Two processes converting the embedded model at once: the second rename finds the first's
    complete checkpoint and keeps it; a directory in the way that is not a checkpoint still fails."""
    from flywheel.models.loading import publish

    out = tmp_path / "model"
    for who in ("first", "second"):
        tmp = tmp_path / f".model.{who}"
        tmp.mkdir()
        (tmp / "config.json").write_text(who)
        (tmp / "model.safetensors").write_text(who)
        publish(tmp, out)
    assert (out / "config.json").read_text() == "first"
    broken = tmp_path / "broken"
    (broken / "partial").mkdir(parents=True)
    tmp = tmp_path / ".broken.new"
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    with pytest.raises(OSError):
        publish(tmp, broken)
