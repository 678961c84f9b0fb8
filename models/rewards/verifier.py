"""verifier: the task's checker, exact / numeric match to the reference, a regex, or a callable."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from flywheel.config import _Source
from flywheel.errors import SourceError
from flywheel.models.rewards.base import Batch, Models, Progress, Source, Verdict, report
from flywheel.models.rewards.registry import register
from flywheel.models.tasks.base import EXACT, extract_answer, numeric


class VerifierSource(_Source):
    """The task's own checker, or a match against the reference answer."""

    type: Literal["verifier"] = "verifier"
    # task: reasoning-gym's score_answer (or the prompts file's answer, numerically); exact / numeric:
    # the extracted final answer vs the reference; regex: `pattern` (with {answer} standing for the
    # escaped reference) searched in the response; callable: `callable` = "module:function",
    # called as f(prompt, response, answer, metadata) -> float | None.
    match: Literal["task", "exact", "numeric", "regex", "callable"] = "task"
    pattern: str | None = None
    callable: str | None = None
    tolerance: float = Field(1e-6, ge=0)

    @model_validator(mode="after")
    def _needs(self) -> VerifierSource:
        if self.match == "regex" and not self.pattern:
            raise ValueError("match: regex needs a pattern")
        if self.match == "callable" and (not self.callable or ":" not in self.callable):
            raise ValueError("match: callable needs callable: 'module:function'")
        return self


class Verifier(Source):
    cheap_decider = True

    def __init__(self, spec: VerifierSource, task_source) -> None:
        super().__init__(spec, task_source)
        self.fn = None
        if spec.match == "callable":
            assert spec.callable is not None  # the spec requires it with match: callable
            self.fn = _import_callable(spec.callable)

    def _extra_hash(self) -> str:
        return self.spec.callable or ""

    def check(self, prompt: str, response: str, answer: str | None, metadata: dict) -> Verdict:
        m = self.spec.match
        if m == "callable":
            return self._call(prompt, response, answer, metadata)
        if m == "task":
            extracted = self.task_source.extract(response, answer)
            score = self.task_source.score(extracted, answer, metadata)
            return Verdict(score, score is not None, extracted)
        extracted = extract_answer(response, answer)
        if answer is None:
            return Verdict(None, False, extracted, {"reason": "no reference answer"})
        if m == "regex":
            pattern = self.spec.pattern.replace("{answer}", re.escape(answer.strip()))
            return Verdict(float(re.search(pattern, response) is not None), True, extracted)
        if extracted is None:
            return Verdict(0.0, True, None)
        if m == "numeric":
            a, b = numeric(extracted), numeric(answer)
            ok = a is not None and b is not None and abs(a - b) <= self.spec.tolerance
            return Verdict(float(ok), True, extracted)
        return Verdict(float(" ".join(extracted.lower().split()) == " ".join(answer.lower().split())), True, extracted)

    def _call(self, prompt: str, response: str, answer: str | None, metadata: dict) -> Verdict:
        assert self.fn is not None  # match: callable
        try:
            score = self.fn(prompt, response, answer, metadata)
        except Exception as e:  # the user's code; kept as an unparsed verdict
            return Verdict(None, False, f"{type(e).__name__}: {e}"[:500], {"error": True})
        if score is not None and not isinstance(score, (int, float)):
            return Verdict(None, False, f"returned {type(score).__name__}, not a number", {"error": True})
        return Verdict(None if score is None else float(score), score is not None, None)

    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        out = []
        for c in batch.candidates:
            p = batch.prompt_of(c)
            out.append(self.check(p["prompt"], c["response"], p["answer"], json.loads(p["metadata"] or "{}")))
        return report(progress, out)


def _import_callable(ref: str):
    module, _, name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SourceError(f"verifier callable {ref!r} cannot be imported ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise SourceError(f"verifier callable {ref!r} is not callable")
    return fn


def probe(sources: Sequence[Source], prompt: str, answer: str | None, metadata: dict) -> None:
    """Run every callable verifier once on a known item before any generation: one that raises
    fails the run now, with its name, instead of after an hour of sampling."""
    for s in sources:
        if isinstance(s, Verifier) and s.spec.match == "callable":
            v = s.check(prompt, answer or "", answer, metadata)
            if v.details.get("error"):
                raise SourceError(f"verifier callable {s.spec.callable!r} failed on a probe item: {v.raw}")


# The verifier is the truth the other sources' health is measured against: full credit is "correct".
register("verifier", spec=VerifierSource, source=Verifier, threshold=EXACT)
