"""What every task source shares: the item, the final-answer extraction, and the one definition
of "exactly correct" that the verifier, curation, the benchmark and the promotion gate all use.

A task source (one module beside this one, registered in `registry.py`) owns its data (`items`),
how a response's final answer is read (`extract`) and how it is scored (`score`): a score in
[0, 1], 1 being full credit, None when the item cannot be scored (no reference answer).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

# A score counts as exactly correct (full credit) from here up: 1 less a float rounding's slack,
# so a full score that went through a mean or a cast still counts.
EXACT = 1.0 - 1e-9

_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# a number without its sign, not part of a word ("x2") or of a decimal ("1.5"), and not a
# step's or a list item's number ("Step 2:", "2." or "2)" at a line's start)
_MAGNITUDE = re.compile(r"(?<![\w.])(?<![sS]tep )\d+(?:,\d{3})*(?:\.\d+)?(?!\w|\.\d)")
_LIST_MARKER = re.compile(r"^\s*\d+[.)]\s", re.MULTILINE)


def exactly_correct(score: float | None) -> bool:
    """Full credit: the one definition of a right answer (partial credit ranks, but is not right)."""
    return score is not None and score >= EXACT


def extract_answer(response: str, reference: str | None = None) -> str | None:
    """The final answer in a response: an <answer> tag, else the last number (numeric tasks),
    else the last non-empty line."""
    tag = _ANSWER_TAG.findall(response)
    if tag:
        return tag[-1].strip()
    if reference is None or _numeric_reference(reference):
        nums = _NUMBER.findall(response)
        return nums[-1].replace(",", "") if nums else None
    lines = [ln.strip() for ln in response.splitlines() if ln.strip()]
    return lines[-1] if lines else None


def numeric(x: str) -> float | None:
    """A number written with or without thousands separators, else None."""
    try:
        return float(x.replace(",", "").strip())
    except (ValueError, AttributeError):
        return None


def _numeric_reference(reference: str) -> bool:
    """A reference answer that is a number (spaces aside): its responses are read for numbers."""
    return _NUMBER.fullmatch(reference.strip().replace(" ", "")) is not None


def _magnitudes(text: str) -> set[str]:
    return {m.replace(",", "") for m in _MAGNITUDE.findall(text)}


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
    """ "task/k1=v1,k2=v2" from the named fields an item has; just "task" when it has none."""
    parts = [f"{k}={fields[k]}" for k in names if fields.get(k) is not None]
    return f"{task}/{','.join(parts)}" if parts else task


class Task:
    """A task source. Generated tasks draw `items(seed, size)` from a seeded generator; a finite
    one (a prompts file) returns its whole pool from `pool()` and rotates through it."""

    name: str = ""
    category_fields: list[str] = []  # noqa: RUF012 - read only; each source sets its own

    def items(self, seed: int, size: int) -> list[Item]:
        raise NotImplementedError

    def pool(self) -> list[Item] | None:
        """Every item, for a finite task; None for a generator."""
        return None

    def extract(self, response: str, reference: str | None) -> str | None:
        return extract_answer(response, reference)

    def score(self, extracted: str | None, item_answer: str | None, metadata: dict[str, Any]) -> float | None:
        raise NotImplementedError

    def shows_work(self, response: str, item: Item) -> bool:
        """Whether a response shows how it reached the answer, not only the answer. sampling.hint keeps
        a hinted sample only if it does: one that just repeats the answer it was given teaches
        answer-only guessing. This default reads numbers: for a numeric answer, a number of the
        prompt's other than the answer must appear in the response. An answer that is not a number,
        or a prompt with no other number, is not judged (True): a task with its own idea of work
        overrides this."""
        if not item.answer or not _numeric_reference(item.answer):
            return True
        answer = _magnitudes(item.answer.replace(" ", ""))
        given = _magnitudes(item.prompt) - answer
        return not given or bool(given & (_magnitudes(_LIST_MARKER.sub("", response)) - answer))

    def evaluate(self, response: str, item: Item) -> tuple[str | None, float | None]:
        """(the extracted answer, its score): what the verifier and the benchmark both record."""
        extracted = self.extract(response, item.answer)
        return extracted, self.score(extracted, item.answer, item.metadata)
