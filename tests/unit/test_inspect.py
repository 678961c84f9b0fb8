"""Inspection and export on a workspace of real Parquet files and a real DuckDB catalog,
curated by the real curate stage (synthetic candidates, no model)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.config import load_config
from flywheel.storage import parquet
from flywheel.tasks.common import StageContext

RUN = "20260101-000000-abcdef"
FLYWHEEL = [sys.executable, "-m", "flywheel.flows.cli"]


def seed_round(ws: Path, round_: int, n_prompts: int = 6) -> None:
    """Prompts with 4 candidates each: 2 right, 2 wrong, except every third prompt (all right)."""
    prompts, cands, judgments = [], [], []
    for i in range(n_prompts):
        text = f"State the final answer to the following arithmetic problem: {i} + {round_} ="
        pid = hashlib.sha256(text.encode()).hexdigest()
        prompts.append(
            dict(
                run_id=RUN,
                round=round_,
                prompt_id=pid,
                split="train",
                task="chain_sum",
                category=f"chain_sum/num_terms={2 + i % 2}",
                seed=i,
                prompt=text,
                answer=str(i + round_),
                metadata="{}",
            )
        )
        for k in range(4):
            right = k < 2 or i % 3 == 0
            response = f"{i + round_}" if right else f"{i + round_ + k}"
            response = response + " " * k  # duplicates after whitespace normalisation
            cid = f"{round_}-{i}-{k}"
            cands.append(
                dict(
                    run_id=RUN,
                    round=round_,
                    candidate_id=cid,
                    prompt_id=pid,
                    policy="m",
                    sample_index=k,
                    seed=0,
                    response=response,
                    n_tokens=1 + k,
                    finish_reason="stop",
                    mean_logprob=-1.0,
                    self_certainty=1.0,
                    sampling="{}",
                )
            )
            judgments.append(
                dict(
                    run_id=RUN,
                    round=round_,
                    candidate_id=cid,
                    prompt_id=pid,
                    source="verifier",
                    spec_hash="h",
                    score=float(right),
                    parse_ok=True,
                    raw=response,
                    details=None,
                )
            )
    parquet.write_table(ws, "prompts", RUN, round_, prompts, part="train")
    parquet.write_table(
        ws, "prompts", RUN, round_, [dict(prompts[0], split="decontaminated", prompt="leaked?")], part="decontaminated"
    )
    parquet.write_table(ws, "candidates", RUN, round_, cands)
    parquet.write_table(ws, "judgments", RUN, round_, judgments)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from flywheel.tasks.curate import curate_task

    ws = tmp_path_factory.mktemp("ws")
    config = load_config(None, {"workspace": str(ws)})
    for r in (1, 2):
        seed_round(ws, r)
        metrics = curate_task.fn(StageContext(config, RUN, r))
        assert metrics["pairs"] == 4 and metrics["prompts_no_signal"] == 2 and metrics["decontaminated_prompts"] == 1
    return ws


def cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*FLYWHEEL, *args], capture_output=True, env=env, timeout=300, cwd=cwd)


def test_data_card_counts_each_filter(ws):
    card = ws / "runs" / RUN / "round=1" / "data_card.md"
    text = card.read_text()
    assert "| candidates sampled | 24 |" in text
    # every prompt's four responses are two distinct texts: "i+r", "i+r " (dup) and two wrong ones
    assert "| … whose samples all score the same (dropped: no signal) | 2 |" in text
    assert "| … after category balance: the round's pairs | 4 |" in text
    assert "leaked?" in text  # the decontaminated prompt is listed
    assert "| chain_sum/num_terms=2 |" in text and "| chain_sum/num_terms=3 |" in text
    png = card.with_name("data_card.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM pairs",
        "COPY (SELECT * FROM pairs) TO 'stolen.csv'",
        "ATTACH 'other.duckdb' AS other",
        "INSTALL httpfs",
        "CREATE TABLE t AS SELECT 1",
        "SELECT 1; DROP VIEW pairs",
    ],
)
def test_sql_refuses_anything_that_writes(ws, tmp_path, statement):
    before = (ws / "catalog.duckdb").read_bytes()
    p = cli("sql", statement, "--workspace", str(ws), cwd=tmp_path)
    assert p.returncode == 2
    err = p.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flywheel: error:") and "Traceback" not in p.stderr.decode()
    assert (ws / "catalog.duckdb").read_bytes() == before
    assert not list(tmp_path.iterdir()), "nothing may be written"


def test_sql_formats(ws, tmp_path):
    q = "SELECT round, count(*) AS n FROM pairs GROUP BY round ORDER BY round"
    csv = cli("sql", q, "--workspace", str(ws), "--format", "csv")
    assert csv.returncode == 0 and csv.stdout.decode().split() == ['"round","n"', "1,4", "2,4"]
    js = cli("sql", q, "--workspace", str(ws), "--format", "json")
    assert [json.loads(line) for line in js.stdout.decode().splitlines()] == [
        {"round": 1, "n": 4},
        {"round": 2, "n": 4},
    ]
    out = tmp_path / "r.parquet"
    pq_run = cli("sql", q, "--workspace", str(ws), "--format", "parquet", "--out", str(out))
    assert pq_run.returncode == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out).to_pylist() == [{"round": 1, "n": 4}, {"round": 2, "n": 4}]
    table = cli("sql", q, "--workspace", str(ws))
    assert table.returncode == 0 and "(2 rows)" in table.stdout.decode()


def test_sql_csv_writes_nested_cells_as_json(ws, tmp_path):
    q = (
        "SELECT round, list(n_tokens ORDER BY n_tokens) AS lens, {'a': round} AS s, MAP {'k': round} AS m "
        "FROM candidates GROUP BY round ORDER BY round"
    )
    p = cli("sql", q, "--workspace", str(ws), "--format", "csv")
    assert p.returncode == 0, p.stderr.decode()
    import csv as csvlib

    rows = list(csvlib.DictReader(p.stdout.decode().splitlines()))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert json.loads(rows[0]["lens"]) == sorted(json.loads(rows[0]["lens"])) and len(json.loads(rows[0]["lens"])) == 24
    assert json.loads(rows[1]["s"]) == {"a": 2}
    assert json.loads(rows[1]["m"]) == [["k", 2]]  # as --format json writes a map
    # a write that fails halfway (here: --out names a folder) leaves no temp file behind
    folder = tmp_path / "out.csv"
    folder.mkdir()
    p = cli("sql", q, "--workspace", str(ws), "--format", "csv", "--out", str(folder))
    assert p.returncode != 0 and folder.is_dir() and not list(folder.iterdir())
    assert [f.name for f in tmp_path.iterdir()] == ["out.csv"]


def test_data_show_prints_a_readable_sample(ws):
    p = cli("data", "show", "pairs", "--round", "2", "--limit", "2", "--workspace", str(ws))
    out = p.stdout.decode() + p.stderr.decode()
    assert p.returncode == 0, out
    assert f"run {RUN}, round 2: 4 row(s), showing 2" in out
    assert out.count("margin 1") == 2 and "chosen" in out and "rejected" in out
    missing = cli("data", "show", "pairs", "--run", "nope", "--workspace", str(ws))
    assert missing.returncode == 2 and "no pairs for run 'nope'" in missing.stderr.decode()


@pytest.mark.parametrize("fmt", ["hf", "parquet", "jsonl"])
def test_export_loads_with_datasets(ws, tmp_path, fmt):
    import datasets

    to = tmp_path / "out"
    p = cli("export", "pairs", "--run", RUN, "--to", str(to), "--format", fmt, "--workspace", str(ws))
    assert p.returncode == 0, p.stderr.decode()
    if fmt == "hf":
        ds = datasets.load_from_disk(str(to))
    else:
        ds = datasets.load_dataset(fmt.replace("jsonl", "json"), data_files=str(to / f"train.{fmt}"), split="train")
    assert len(ds) == 8 and {"prompt", "chosen", "rejected", "margin", "pair_id"} <= set(ds.column_names)
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    assert "flywheel pairs" in (to / "README.md").read_text()
    one = cli(
        "export",
        "sft",
        "--run",
        RUN,
        "--round",
        "1",
        "--to",
        str(tmp_path / "sft"),
        "--format",
        fmt,
        "--workspace",
        str(ws),
    )
    assert one.returncode == 0, one.stderr.decode()


def test_export_never_overwrites_and_names_unknown_runs(ws, tmp_path):
    to = tmp_path / "taken"
    to.mkdir()
    (to / "keep.txt").write_text("mine")
    p = cli("export", "pairs", "--to", str(to), "--workspace", str(ws))
    assert p.returncode == 2 and "is not an empty directory" in p.stderr.decode()
    assert [f.name for f in to.iterdir()] == ["keep.txt"] and (to / "keep.txt").read_text() == "mine"
    p = cli("export", "pairs", "--run", "nope", "--to", str(tmp_path / "x"), "--workspace", str(ws))
    assert p.returncode == 2 and "no pairs for run 'nope'" in p.stderr.decode()
    p = cli("export", "pairs", "--run", RUN, "--round", "9", "--to", str(tmp_path / "x"), "--workspace", str(ws))
    assert p.returncode == 2 and f"no pairs for round 9 of run '{RUN}'" in p.stderr.decode()
    assert not (tmp_path / "x").exists()


def test_exported_pairs_train_one_dpo_step(ws, tmp_path):
    """The export is TRL's format: DPOTrainer takes it as it is, on the real embedded model."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from flywheel.models import loading

    to = tmp_path / "hf"
    assert cli("export", "pairs", "--run", RUN, "--to", str(to), "--workspace", str(ws)).returncode == 0
    ds = datasets.load_from_disk(str(to))
    ref = loading.resolve("embedded:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(ref)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    args = DPOConfig(
        output_dir=str(tmp_path / "t"),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        max_length=64,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 1
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight), "one DPO step changed the weights"


@pytest.mark.parametrize("share, expected", [(0.0, 0), (0.2, 1), (0.5, 4), (0.9, 4)])
def test_replay_mixes_a_share_of_earlier_rounds(ws, share, expected):
    from flywheel.tasks.train import replay_count, training_rows

    config = load_config(None, {"workspace": str(ws), "curation": {"replay": share}})
    rows, n = training_rows(StageContext(config, RUN, 2))
    assert n == expected == min(replay_count(4, share), 4)  # round 1 has 4 pairs to replay
    assert [r["round"] for r in rows] == [2] * 4 + [1] * expected
    assert len({r["pair_id"] for r in rows}) == len(rows), "a replayed pair appears once"
    assert rows == training_rows(StageContext(config, RUN, 2))[0], "the replay sample is seeded"
    first, n1 = training_rows(StageContext(config, RUN, 1))
    assert n1 == 0 and {r["round"] for r in first} == {1}, "round 1 has nothing earlier to replay"
    sft_cfg = load_config(None, {"workspace": str(ws), "train": {"method": "sft"}, "curation": {"replay": share}})
    sft_rows, _ = training_rows(StageContext(sft_cfg, RUN, 2))
    assert all("completion" in r for r in sft_rows)
