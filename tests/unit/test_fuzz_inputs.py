"""Fuzzed input files (hypothesis): whatever a config file or a prompts file holds, `flywheel run`
ends in exit code 2 with one line on stderr naming the problem, or the input is valid; and the
workspace it was pointed at is left byte for byte as it was.

Every case goes through the CLI's own main(), in this process. No model runs: a config case stops
where the run would start its work (the Prefect API, right after the config is loaded), and a
prompts case names a model path that does not exist, the last check before any work. A valid input
is then loaded again by the function the CLI uses (flywheel.config.load_config, the task source's
FileSource), which must return normally; an invalid one must raise the error the CLI printed.
Derandomized: CI runs the same cases every time.
"""

import contextlib
import io
import os
import typing
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flywheel.config import FlywheelConfig, load_config
from flywheel.errors import UserError
from flywheel.flows import cli
from flywheel.models.tasks.prompts_file import FileSource

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class ReachedWork(Exception):
    """The run got past every input check and would start its work now."""


def _field_names() -> set[str]:
    """Every field name of the config, at any depth (the reward sources' too): keys that reach the
    validators, not only the unknown-key check."""
    names, todo, seen = set(), [FlywheelConfig], set()
    while todo:
        model = todo.pop()
        if model not in seen:
            seen.add(model)
            for name, field in model.model_fields.items():
                names.add(name)
                todo += _models(field.annotation)
    return names


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _yaml(value) -> bytes:
    return yaml.safe_dump(value, allow_unicode=True).encode()


KEYS = sorted(
    _field_names()
    | {
        "verifier",
        "llm_judge",
        "pairwise_judge",
        "majority_vote",
        "beta",
        "learning_rate",
        "loss_type",
        "openai",
        "hf",
        "vllm",
        "base_url",
        "api_key_env",
    }
)
# YAML and Arrow cannot hold lone surrogates (JSON can: the prompts files have them)
CHARS = st.characters(exclude_categories=("Cs",))
TEXT = st.text(CHARS, max_size=20)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**30, -(10**30), 2**63, -1, 0, 2**31])
    | st.floats()
    | TEXT
    | st.sampled_from(KEYS)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | TEXT | st.integers(), inner, max_size=4)
    ),
    max_leaves=20,
)
CONFIG_FILES = st.one_of(
    st.dictionaries(st.sampled_from(KEYS) | TEXT, VALUES, max_size=6).map(_yaml),
    VALUES.map(_yaml),  # any top: a list, a scalar, null
    st.just(b""),
    st.binary(max_size=200),
    TEXT.map(str.encode),
)

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


def _jsonl(record, raw_unicode: bool) -> bytes:
    """One JSON Lines record; raw: non-ASCII (lone surrogates too) as UTF-8 bytes, not \\u escapes."""
    import json

    return json.dumps(record, ensure_ascii=not raw_unicode).encode("utf-8", "surrogatepass")


# A record that may be good (a text prompt: only a blank or a lone surrogate makes it bad) …
MAYBE_GOOD = st.builds(
    _jsonl,
    st.fixed_dictionaries({"prompt": st.text()}, optional={"answer": JSON_VALUES, "topic": JSON_VALUES}),
    st.booleans(),
)
# … and lines that almost never are (no prompt, a prompt of another type, not an object, not JSON).
BAD = st.one_of(
    st.builds(
        _jsonl, st.fixed_dictionaries({"prompt": JSON_VALUES.filter(lambda v: not isinstance(v, str))}), st.booleans()
    ),
    st.builds(
        _jsonl, st.dictionaries(st.text().filter(lambda k: k != "prompt"), JSON_VALUES, max_size=3), st.booleans()
    ),
    st.builds(_jsonl, JSON_VALUES.filter(lambda v: not isinstance(v, dict)), st.booleans()),
    st.sampled_from(
        [
            b"{broken",
            b'{"prompt": "x"',
            b"\xff\xfe",
            b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}",
            b"[" * 5000,
            b'{"prompt": "\\ud800"}',
        ]
    ),
    st.binary(min_size=1, max_size=50),
)
FILLER = st.sampled_from([b"", b"   ", b"\r", b'{"prompt": "' + b"y" * 100_000 + b'"}'])  # blank lines, a huge one
# About half the files hold no bad line, so that the checks after the file's (splits, sources) see many.
PROMPT_FILES = st.tuples(st.lists(MAYBE_GOOD | FILLER, max_size=5), st.lists(BAD, max_size=1)).flatmap(
    lambda t: st.permutations(t[0] + t[1]).map(b"\n".join)
)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A workspace seeded with files that must never change, a folder for the fuzzed files, and a
    monkeypatch for where each test stops the run; the environment variables and warning filters
    that main() sets are restored after."""
    root = tmp_path_factory.mktemp("fuzz")
    ws = root / "ws"
    for rel, data in {
        "catalog.duckdb": b"\x00duckdb?",
        "runs/r1/config.yaml": b"rounds: 1\n",
        "tables/pairs/run_id=r1/round=1/part.parquet": b"PAR1\x00PAR1",
        "README": "ünïcode\n".encode(),
    }.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_bytes(data)
    env = dict(os.environ)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setenv("FLYWHEEL_CACHE", str(root / "cache"))
        yield root, ws, mp
    os.environ.clear()
    os.environ.update(env)


def _snapshot(ws: Path) -> dict[str, bytes]:
    return {str(p.relative_to(ws)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(ws.rglob("*"))}


def _main(argv: list[str]) -> tuple[object, list[str]]:
    """main(argv) → (exit code, or "reached work"; stderr's lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code
        except ReachedWork:
            rc = "reached work"
    return rc, err.getvalue().splitlines()


def _one_line_error(rc, lines: list[str]) -> str:
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("flywheel: error: "), (rc, lines)
    return lines[0].removeprefix("flywheel: error: ")


def _reached_work(**kw):
    raise ReachedWork


@given(content=CONFIG_FILES)
@FUZZ
def test_any_config_file_is_valid_or_one_line_error(sandbox, content):
    root, ws, mp = sandbox
    mp.setattr("flywheel.flows.server.starting_prefect_api", _reached_work)
    before = _snapshot(ws)
    f = root / "config.yaml"
    f.write_bytes(content)
    argv = ["run", "--config", str(f), "--workspace", str(ws)]
    rc, lines = _main(argv)
    overrides = cli.overrides_from_args(cli.build_parser().parse_args(argv))
    event("valid" if rc == "reached work" else "refused")  # --hypothesis-show-statistics shows the mix
    if rc == "reached work":
        assert lines == [], lines
        load_config(f, overrides)  # valid: the CLI's loader takes it as it is
    else:
        message = _one_line_error(rc, lines)
        with pytest.raises(UserError) as e:
            load_config(f, overrides)
        assert message == cli.one_line(str(e.value))
    assert _snapshot(ws) == before


@contextlib.contextmanager
def _no_server(**kw):
    """No Prefect server starts: a prompts case ends at the model check, before the run would use it."""
    yield contextlib.nullcontext


def _check_prompts_file(sandbox, f: Path) -> None:
    root, ws, mp = sandbox
    mp.setattr("flywheel.flows.server.starting_prefect_api", _no_server)
    before = _snapshot(ws)
    no_model = str(root / "no-such-model")
    message = _one_line_error(*_main(["run", "--prompts", str(f), "--model", no_model, "--workspace", str(ws)]))
    valid = message.startswith(f"model path {no_model!r} is not a transformers checkpoint")
    event("valid" if valid else "refused")
    if valid:
        assert FileSource(f)._items  # valid: every check before the model's passed
    else:
        with pytest.raises(UserError) as e:
            FileSource(f)
        assert message == cli.one_line(str(e.value))
    assert _snapshot(ws) == before


@given(content=PROMPT_FILES)
@FUZZ
def test_any_jsonl_prompts_file_is_valid_or_one_line_error(sandbox, content):
    f = sandbox[0] / "prompts.jsonl"
    f.write_bytes(content)
    _check_prompts_file(sandbox, f)


ARROW_COLUMNS = st.sampled_from(["string", "int64", "float64", "bool", "binary", "list<string>", "timestamp"])


@st.composite
def parquet_tables(draw):
    import datetime

    import pyarrow as pa

    n = draw(st.integers(0, 4))
    values = {
        "string": st.text(CHARS),
        "int64": st.integers(-(2**63), 2**63 - 1),
        "float64": st.floats(),
        "bool": st.booleans(),
        "binary": st.binary(max_size=8),
        "list<string>": st.lists(st.text(CHARS, max_size=3), max_size=2),
        "timestamp": st.datetimes(min_value=datetime.datetime(1900, 1, 1)),
    }
    types = {
        "string": pa.string(),
        "int64": pa.int64(),
        "float64": pa.float64(),
        "bool": pa.bool_(),
        "binary": pa.binary(),
        "list<string>": pa.list_(pa.string()),
        "timestamp": pa.timestamp("us"),
    }
    # a prompt column, mostly of text (so that many files are valid), and others of any type
    others = st.lists(st.sampled_from(["answer", "topic"]) | st.text(CHARS, max_size=4), max_size=3, unique=True)
    kinds = {"prompt": draw(st.sampled_from(["string"] * 3) | ARROW_COLUMNS)}
    kinds |= {name: draw(ARROW_COLUMNS) for name in draw(others) if name != "prompt"}
    columns = {}
    for name, kind in kinds.items():
        cell = st.none() | values[kind] if name != "prompt" else values[kind] | st.none()
        columns[name] = pa.array(draw(st.lists(cell, min_size=n, max_size=n)), type=types[kind])
    return pa.table(columns)


@given(table=parquet_tables())
@FUZZ
def test_any_parquet_prompts_file_is_valid_or_one_line_error(sandbox, table):
    import pyarrow.parquet as pq

    f = sandbox[0] / "prompts.parquet"
    pq.write_table(table, f)
    _check_prompts_file(sandbox, f)


@given(content=st.binary(max_size=300))
@settings(FUZZ, max_examples=30)
def test_any_bytes_as_a_parquet_file_are_one_line_error(sandbox, content):
    f = sandbox[0] / "prompts.parquet"
    f.write_bytes(content)
    _check_prompts_file(sandbox, f)
