"""Task sources: where prompts (and reference answers, and the verifier) come from.

reasoning-gym items are generated from (seed + index); a flywheel draws training prompts and its
evaluation splits (validation: decisions; test: reported) from disjoint seed ranges, the splits
without replacement, and drops any training prompt that overlaps an evaluation item or that an
earlier round trained on (models/decontam.py; small task spaces repeat questions).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from flywheel.errors import TaskError
from flywheel.models.decontam import Decontaminator, Overlap, normal_forms

BENCHMARK_SEED_BASE = 10_000_000
TRAIN_SEED_BASE = 20_000_000




def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Item:
    prompt: str
    answer: str | None
    task: str
    seed: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    category: str = ""

    @property
    def id(self) -> str:
        return prompt_id(self.prompt)


def category(task: str, fields: dict[str, Any], names: list[str]) -> str:
    """"task/k1=v1,k2=v2" from the named fields an item has; just "task" when it has none."""
    parts = [f"{k}={fields[k]}" for k in names if fields.get(k) is not None]
    return f"{task}/{','.join(parts)}" if parts else task


class ReasoningGymSource:
    def __init__(self, name: str, options: dict[str, Any], instruction: str = "",
                 category_fields: list[str] | None = None) -> None:
        self.category_fields = list(category_fields or [])
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        if name not in DATASETS:
            raise TaskError(f"unknown reasoning-gym task {name!r} (e.g. {', '.join(sorted(DATASETS)[:5])}, …)")
        self.name, self.options, self.instruction = name, dict(options), instruction
        try:
            self._scorer = reasoning_gym.create_dataset(name, **{**self.options, "seed": 0, "size": 1})
        except (TypeError, AssertionError, ValueError) as e:
            raise TaskError(f"bad options for reasoning-gym task {name!r}: {e}") from None

    def items(self, seed: int, size: int) -> list[Item]:
        import reasoning_gym

        ds = reasoning_gym.create_dataset(self.name, **{**self.options, "seed": seed, "size": size})
        out = []
        for i, entry in enumerate(ds):
            q = entry["question"] + (f"\n{self.instruction}" if self.instruction else "")
            meta = {"entry": {"question": entry["question"], "answer": entry["answer"],
                              "metadata": entry.get("metadata", {})}}
            out.append(Item(q, str(entry["answer"]), self.name, seed + i, json.loads(json.dumps(meta, default=str)),
                            category(self.name, entry.get("metadata", {}), self.category_fields)))
        return out

    def score(self, extracted: str | None, item_answer: str | None, metadata: dict[str, Any]) -> float:
        entry = metadata.get("entry") or {"answer": item_answer, "metadata": {}}
        return float(self._scorer.score_answer(extracted, entry))


class FileSource:
    """JSONL or Parquet with a `prompt` column and an optional `answer` column."""

    def __init__(self, path: Path, instruction: str = "", category_fields: list[str] | None = None) -> None:
        self.path, self.instruction, self.name = Path(path), instruction, Path(path).stem
        self.category_fields = list(category_fields or [])
        self._items = self._load()

    def _load(self) -> list[Item]:
        if not self.path.is_file():
            raise TaskError(f"prompts file not found: {self.path}")
        rows = self._parquet_rows() if self.path.suffix == ".parquet" else self._jsonl_rows()
        if not rows:
            raise TaskError(f"prompts file {self.path} has no prompts")
        # metadata as JSON values (a Parquet file's dates, decimals, bytes as text): the prompts
        # table stores it as JSON
        return [Item(r["prompt"] + (f"\n{self.instruction}" if self.instruction else ""),
                     None if r.get("answer") is None else str(r["answer"]), self.name, None,
                     json.loads(json.dumps({k: v for k, v in r.items() if k not in ("prompt", "answer")}, default=str)),
                     category(self.name, r, self.category_fields)) for r in rows]

    def _parquet_rows(self) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(self.path).to_pylist()
        except Exception as e:  # noqa: BLE001 - any arrow error means the same thing to the user
            raise TaskError(f"{self.path}: not a readable Parquet file ({e})") from None
        for i, r in enumerate(rows, 1):
            self._check(r, f"{self.path} row {i}")
        return rows

    def _jsonl_rows(self) -> list[dict[str, Any]]:
        rows = []
        # JSON Lines ends a record at "\n" only: str.splitlines() would also cut a record at characters
        # a JSON string may hold as they are (U+2028, U+0085, form feed…).
        for n, raw in enumerate(self.path.read_bytes().split(b"\n"), 1):
            at = f"{self.path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise TaskError(f"{at}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            rows.append(self._check(_json_line(line, at), at))
        return rows

    @staticmethod
    def _check(r: Any, at: str) -> dict[str, Any]:
        if not isinstance(r, dict):
            raise TaskError(f"{at}: expected a JSON object with a 'prompt' field")
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise TaskError(f"{at}: missing or empty 'prompt' field")
        return r

    def items(self, seed: int, size: int) -> list[Item]:
        # Files have no generator: rotate through the file deterministically.
        n = len(self._items)
        return [self._items[(seed + i) % n] for i in range(min(size, n))]

    def score(self, extracted: str | None, item_answer: str | None, metadata: dict[str, Any]) -> float | None:
        if item_answer is None:
            return None
        if extracted is None:
            return 0.0
        try:
            return float(float(extracted.replace(",", "")) == float(item_answer.replace(",", "")))
        except ValueError:
            return float(extracted.strip().lower() == item_answer.strip().lower())


def _json_line(line: str, at: str) -> Any:
    """One JSON Lines record, whose strings are text: the prompts table stores them as UTF-8."""
    try:
        record = json.loads(line)
        json.dumps(record, ensure_ascii=False).encode()
    except json.JSONDecodeError as e:
        raise TaskError(f"{at}: malformed JSON ({e.msg})") from None
    except UnicodeEncodeError:
        raise TaskError(f"{at}: a string holds a lone surrogate escape (e.g. \\ud800), which is not text") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting deeper than the parser goes
        raise TaskError(f"{at}: unreadable JSON ({str(e).split(';')[0] or type(e).__name__})") from None
    return record


def make_source(task_cfg) -> ReasoningGymSource | FileSource:
    if task_cfg.prompts_file is not None:
        return FileSource(task_cfg.prompts_file, task_cfg.instruction, task_cfg.category_fields)
    return ReasoningGymSource(task_cfg.name, task_cfg.options, task_cfg.instruction, task_cfg.category_fields)


def benchmark_items(source, size: int, seed: int) -> list[Item]:
    """The test split (validation size 0): see eval_items."""
    return eval_items(source, 0, size, seed)[1]


def eval_items(source, validation_size: int, test_size: int, seed: int) -> tuple[list[Item], list[Item]]:
    """(validation, test): distinct items, drawn without replacement, none sharing a normalised
    form with another (models/decontam.py: `3 + 5` and `5 + 3` are one item). A task space too
    small for the sizes gives fewer. From a prompts file: at most a fifth of it, lines with a
    reference answer first (only those can be scored), validation first."""
    if isinstance(source, FileSource):
        n = min(validation_size + test_size, max(1, len(source._items) // 5))
        pool = sorted(source.items(seed, len(source._items)), key=lambda it: it.answer is None)
        picked = _distinct(pool, n)
        share = round(len(picked) * validation_size / max(1, validation_size + test_size))
        v = min(validation_size, max(share, 1 if len(picked) >= 2 and validation_size else 0))
        return picked[:v], picked[v:]
    want = validation_size + test_size
    base = BENCHMARK_SEED_BASE + seed * 100_000
    pool = (it for offset in range(0, 50 * max(want, 1), max(want, 1)) for it in source.items(base + offset, want))
    picked = _distinct(pool, want)
    return picked[:validation_size], picked[validation_size:]


def _distinct(pool, n: int, used: set[str] | None = None) -> list[Item]:
    seen = set(used or ())
    out = []
    for it in pool:
        if len(out) == n:
            break
        forms = normal_forms(it.prompt, it.metadata)
        if forms & seen:
            continue
        seen |= forms
        out.append(it)
    return out


class Draw(NamedTuple):
    items: list[Item]  # the round's training prompts
    removed: list[tuple[Item, Overlap]]  # drawn, then dropped as overlapping an evaluation item
    repeats: int  # drawn, then skipped as a prompt (or a form of one) an earlier round trained on


def train_items(source, round_: int, size: int, seed: int, decontam: Decontaminator | None) -> Draw:
    """Up to `size` distinct training prompts for round `round_`, none overlapping an evaluation
    item (decontam) and none that an earlier round of the run trained on (by normalised form):
    each round's prompts are fresh. The earlier rounds' draws are recomputed (they depend only on
    the seed and the settings), so a resumed run or a stage on another machine draws the same.
    Small task spaces repeat questions, so the draw goes on (bounded) until `size` prompts are
    found; a space too small for that yields fewer."""
    used: set[str] = set()
    draw = Draw([], [], 0)
    for r in range(1, max(round_, 1) + 1):
        draw = _draw_round(source, r, size, seed, decontam, used)
        used |= {f for it in draw.items for f in normal_forms(it.prompt, it.metadata)}
    return draw


def _draw_round(source, round_: int, size: int, seed: int, decontam: Decontaminator | None, used: set[str]) -> Draw:
    if isinstance(source, FileSource):
        pool = source.items(round_ * size, len(source._items))
    else:
        base = TRAIN_SEED_BASE + seed * 1_000_000 + round_ * 10_000
        pool = [it for offset in range(0, 20 * size, size) for it in source.items(base + offset, size)]
    kept: dict[str, Item] = {}
    removed: dict[str, tuple[Item, Overlap]] = {}
    forms_kept: set[str] = set()
    repeats = 0
    for it in pool:
        if len(kept) == size:
            break
        if it.id in kept or it.id in removed:
            continue
        forms = normal_forms(it.prompt, it.metadata)
        if forms & used:
            repeats += 1
            continue
        if forms & forms_kept:
            continue  # the same problem in another form, already in this round
        hit = decontam.contaminated(it.prompt, it.metadata) if decontam else None
        if hit:
            removed[it.id] = (it, hit)
        else:
            kept[it.id] = it
            forms_kept |= forms
    return Draw(list(kept.values()), list(removed.values()), repeats)
