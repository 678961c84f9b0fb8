"""What every reward source shares: the verdict, the batch it judges, the models it may open, and
the `Source` interface. A source is one module in this package (or a plugin's) that declares its
config spec, its class and its health figures, and registers them (registry.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Progress = Callable[[int], None]


@dataclass
class Verdict:
    score: float | None
    parse_ok: bool
    raw: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """What a source sees: the round's candidates and their prompts."""

    prompts: dict[str, dict]  # prompt_id → prompts-table row
    candidates: list[dict]  # candidates-table rows

    def prompt_of(self, c: dict) -> dict:
        return self.prompts[c["prompt_id"]]

    def unique(self) -> tuple[list[dict], list[int]]:
        """Distinct (prompt, normalised response) candidates, and each candidate's index among them."""
        first: dict[tuple[str, str], int] = {}
        reps: list[dict] = []
        index = []
        for c in self.candidates:
            key = (c["prompt_id"], " ".join(c["response"].split()))
            if key not in first:
                first[key] = len(reps)
                reps.append(c)
            index.append(first[key])
        return reps, index


@dataclass
class Models:
    """Model refs a source may need, opened on demand as engines (models/engines: one open at a time)."""

    policy: str
    previous: str | None = None  # the previous round's policy (CREAM's second ranking)
    reference: str | None = None  # the DPO reference the policy was trained against
    dtype: str = "auto"
    batch_size: int = 16
    max_prompt_tokens: int = 1024
    seed: int = 0
    model: Any = None  # how the policy runs (a ModelConfig: engine, dtype); None: hf with `dtype`

    def engine(self, ref: str):
        """An engine on one of the policy's lineage (policy, previous, reference)."""
        from flywheel import config as C
        from flywheel.models import engines

        cfg = self.model or C.ModelConfig(dtype=self.dtype)
        return engines.open_engine(cfg, ref)

    def judge_engine(self, spec):
        """The engine a judge source scores with: its own `model`, else the policy."""
        from flywheel.models import engines

        if getattr(spec, "model", None) is None:
            return self.engine(self.policy)
        return engines.open_engine(spec.model, engines.model_ref(spec.model))


class Source:
    model_based = False
    cheap_decider = False  # its scores can tell that a prompt cannot yield a pair (judge.subset: contested)
    needs_reference = False  # opens the DPO reference: run after the sources on the policy (fewer model loads)
    judged_by: str | None = None  # the model that judged (engine:ref), recorded in judge health
    method: str | None = None  # how a model-based verdict was read (engines.Engine.verdict_method)

    def __init__(self, spec, task_source) -> None:
        self.spec, self.name = spec, spec.key()
        self.task_source = task_source

    @classmethod
    def later(cls, spec, task_source) -> list[Source]:
        """Sources the spec also asks for that run after every other (llm_judge's previous: true)."""
        return []

    @property
    def spec_hash(self) -> str:
        spec = self.spec.hashed(self.spec.model_dump(mode="json"))
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode() + self._extra_hash().encode()).hexdigest()[:16]

    def _extra_hash(self) -> str:
        return ""

    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        raise NotImplementedError

    def work(self, batch: Batch, seed: int) -> tuple[int, str]:
        """How many units `judge` will report progress in, and their name."""
        if self.model_based:  # identical responses are judged once
            return len(batch.unique()[0]), "candidates"
        return len(batch.candidates), "candidates"


def report(progress: Progress | None, out: list[Verdict]) -> list[Verdict]:
    """The verdicts of a source that judges in one step, its progress reported at once."""
    if progress:
        progress(len(out))
    return out
