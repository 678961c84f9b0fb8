"""Export curated data as a Hugging Face `datasets` dataset in TRL's conversational formats.

pairs → preference: prompt / chosen / rejected as message lists (DPOTrainer's format)
sft   → prompt-completion: prompt / completion as message lists (SFTTrainer's format)

Provenance columns (run, round, ids, scores, margin) ride along; TRL ignores them. The target
directory is written under a temporary name and renamed, so a failed export leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from flywheel.errors import ExportError
from flywheel.storage import catalog

FORMATS = ("parquet", "jsonl", "hf")
EXPORTABLE = ("pairs", "sft")
_PROVENANCE = {
    "pairs": (
        "run_id",
        "round",
        "pair_id",
        "prompt_id",
        "chosen_score",
        "rejected_score",
        "margin",
        "rule",
        "reward",
        "category",
    ),
    "sft": ("run_id", "round", "candidate_id", "prompt_id", "score", "reward", "category"),
}


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def conversational(table: str, rows: Sequence[dict]) -> list[dict]:
    """Rows of the pairs / sft table → TRL's conversational records (plus provenance columns)."""
    if table == "pairs":
        out = [
            {"prompt": _user(r["prompt"]), "chosen": _assistant(r["chosen"]), "rejected": _assistant(r["rejected"])}
            for r in rows
        ]
    else:
        out = [{"prompt": _user(r["prompt"]), "completion": _assistant(r["completion"])} for r in rows]
    for rec, r in zip(out, rows):
        rec.update({k: r[k] for k in _PROVENANCE[table] if k in r})
    return out


def select(root: Path, table: str, run_id: str | None, round_: int | None) -> tuple[pa.Table, str]:
    """A table's rows for one run (default: the latest run that has any) and optionally one round."""
    if table not in EXPORTABLE:
        raise ExportError(f"cannot export {table!r}: choose one of {', '.join(EXPORTABLE)}")
    with catalog.connect(root) as con:
        if run_id is None:
            run_id = con.sql(f"SELECT max(run_id) FROM {table}").fetchall()[0][0]
            if run_id is None:
                raise ExportError(f"no {table} in {root} yet")
        where = "run_id = $run" + ("" if round_ is None else " AND round = $round")
        params = {"run": run_id} | ({} if round_ is None else {"round": round_})
        rows = con.sql(f"SELECT * FROM {table} WHERE {where} ORDER BY round, prompt_id", params=params).to_arrow_table()
        if rows.num_rows == 0:
            known = con.sql(f"SELECT count(*) FROM {table} WHERE run_id = $run", params={"run": run_id}).fetchall()[0][
                0
            ]
            what = f"run {run_id!r}" if not known else f"round {round_} of run {run_id!r}"
            raise ExportError(f"no {table} for {what}")
    return rows, run_id


def card(table: str, run_id: str, round_: int | None, n: int, fmt: str) -> str:
    kind = "preference pairs (prompt / chosen / rejected)" if table == "pairs" else "SFT examples (prompt / completion)"
    load = {
        "hf": 'datasets.load_from_disk("<dir>")',
        "parquet": 'datasets.load_dataset("parquet", data_files="<dir>/train.parquet")',
        "jsonl": 'datasets.load_dataset("json", data_files="<dir>/train.jsonl")',
    }[fmt]
    return f"""---
tags: [flywheel, {"dpo" if table == "pairs" else "sft"}, synthetic]
---
# flywheel {table}: run {run_id}{"" if round_ is None else f", round {round_}"}

{n} {kind}, curated by flywheel from the model's own samples, in TRL's conversational format.

Load: `{load}`; train: `trl.{"DPOTrainer" if table == "pairs" else "SFTTrainer"}(…, train_dataset=ds)`.
Provenance columns: {", ".join(_PROVENANCE[table])}. The curation rule, reward source and margin of
every row are in its columns; the round's data card is `runs/{run_id}/round=<k>/data_card.md` in the workspace.
"""


def export(root: Path, table: str, run_id: str | None, round_: int | None, to: Path, fmt: str) -> tuple[Path, int]:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise ExportError(f"{to} exists and is not an empty directory; nothing was written")
    rows, run_id = select(root, table, run_id, round_)
    from datasets import Dataset

    ds = Dataset.from_list(conversational(table, rows.to_pylist()))
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
    try:
        if fmt == "hf":
            ds.save_to_disk(str(tmp))
        elif fmt == "parquet":
            ds.to_parquet(str(tmp / "train.parquet"))
        else:
            with open(tmp / "train.jsonl", "w") as f:
                for rec in ds:
                    f.write(json.dumps(rec) + "\n")
        (tmp / "README.md").write_text(card(table, run_id, round_, len(ds), fmt))
        if to.exists():
            to.rmdir()  # empty, checked above
        os.replace(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return to, len(ds)
