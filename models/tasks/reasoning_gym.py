"""Any reasoning-gym dataset by name (`task.name`, `task.options`): items generated from
(seed + index), scored by the dataset's own `score_answer`."""

from __future__ import annotations

import json
from typing import Any

from flywheel.errors import TaskError
from flywheel.models.tasks.base import Item, Task, category
from flywheel.models.tasks.registry import FALLBACK, register


class ReasoningGymSource(Task):
    def __init__(
        self, name: str, options: dict[str, Any], instruction: str = "", category_fields: list[str] | None = None
    ) -> None:
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

    @classmethod
    def from_config(cls, task_cfg) -> ReasoningGymSource:
        return cls(task_cfg.name, task_cfg.options, task_cfg.instruction, task_cfg.category_fields)

    def items(self, seed: int, size: int) -> list[Item]:
        import reasoning_gym

        ds = reasoning_gym.create_dataset(self.name, **{**self.options, "seed": seed, "size": size})
        out = []
        for i, entry in enumerate(ds):
            q = entry["question"] + (f"\n{self.instruction}" if self.instruction else "")
            meta = {
                "entry": {
                    "question": entry["question"],
                    "answer": entry["answer"],
                    "metadata": entry.get("metadata", {}),
                }
            }
            out.append(
                Item(
                    q,
                    str(entry["answer"]),
                    self.name,
                    seed + i,
                    json.loads(json.dumps(meta, default=str)),
                    category(self.name, entry.get("metadata", {}), self.category_fields),
                )
            )
        return out

    def score(self, extracted: str | None, item_answer: str | None, metadata: dict[str, Any]) -> float:
        entry = metadata.get("entry") or {"answer": item_answer, "metadata": {}}
        return float(self._scorer.score_answer(extracted, entry))


register(FALLBACK, factory=ReasoningGymSource.from_config)
