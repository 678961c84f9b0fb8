"""A JSONL or Parquet prompts file (`task.prompts_file`): a `prompt` column, an optional
`answer` column (a line without one is never scored), any other columns kept as metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flywheel.errors import TaskError
from flywheel.models.tasks.base import Item, Task, category
from flywheel.models.tasks.registry import PROMPTS_FILE, register


class FileSource(Task):
    """JSONL or Parquet with a `prompt` column and an optional `answer` column."""

    def __init__(self, path: Path, instruction: str = "", category_fields: list[str] | None = None) -> None:
        self.path, self.instruction, self.name = Path(path), instruction, Path(path).stem
        self.category_fields = list(category_fields or [])
        self._items = self._load()

    @classmethod
    def from_config(cls, task_cfg) -> FileSource:
        return cls(task_cfg.prompts_file, task_cfg.instruction, task_cfg.category_fields)

    def pool(self) -> list[Item]:
        return self._items

    def _load(self) -> list[Item]:
        if not self.path.is_file():
            raise TaskError(f"prompts file not found: {self.path}")
        rows = self._parquet_rows() if self.path.suffix == ".parquet" else self._jsonl_rows()
        if not rows:
            raise TaskError(f"prompts file {self.path} has no prompts")
        # metadata as JSON values (a Parquet file's dates, decimals, bytes as text): the prompts
        # table stores it as JSON
        return [
            Item(
                r["prompt"] + (f"\n{self.instruction}" if self.instruction else ""),
                None if r.get("answer") is None else str(r["answer"]),
                self.name,
                None,
                json.loads(json.dumps({k: v for k, v in r.items() if k not in ("prompt", "answer")}, default=str)),
                category(self.name, r, self.category_fields),
            )
            for r in rows
        ]

    def _parquet_rows(self) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(self.path).to_pylist()
        except Exception as e:  # any arrow error means the same thing to the user
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


register(PROMPTS_FILE, factory=FileSource.from_config)
