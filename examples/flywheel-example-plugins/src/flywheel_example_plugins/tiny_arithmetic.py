"""A task source: `a + b` and `a - b` with operands up to `options.max`, generated offline from
the seed (item i of a draw is a function of seed + i alone), scored by exact numeric match."""

from __future__ import annotations

import random
from typing import Any

from flywheel.errors import TaskError
from flywheel.models.tasks import Item, Task, category, numeric, register


class TinyArithmetic(Task):
    def __init__(self, task_cfg) -> None:
        unknown = sorted(set(task_cfg.options) - {"max"})
        if unknown:
            raise TaskError(f"task tiny_arithmetic: unknown option {unknown[0]!r} (known: 'max')")
        self.name, self.instruction = task_cfg.name, task_cfg.instruction
        self.max = int(task_cfg.options.get("max", 20))
        self.category_fields = list(task_cfg.category_fields)

    def items(self, seed: int, size: int) -> list[Item]:
        return [self._item(seed + i) for i in range(size)]

    def _item(self, seed: int) -> Item:
        rng = random.Random(seed)
        a, b, op = rng.randint(0, self.max), rng.randint(0, self.max), rng.choice("+-")
        question = f"What is {a} {op} {b}?" + (f"\n{self.instruction}" if self.instruction else "")
        fields = {"op": op, "expression": f"{a} {op} {b}"}
        return Item(
            question,
            str(a + b if op == "+" else a - b),
            self.name,
            seed,
            fields,
            category(self.name, fields, self.category_fields),
        )

    def score(self, extracted: str | None, item_answer: str | None, metadata: dict[str, Any]) -> float | None:
        if item_answer is None:
            return None
        got = None if extracted is None else numeric(extracted)
        return float(got is not None and got == float(item_answer))


register("tiny_arithmetic", factory=TinyArithmetic)
