"""llm_judge: the policy (or a judge model) with a pointwise rubric (Self-Rewarding LMs),
optionally k sampled verdicts; with previous: true, also the previous round's policy (CREAM)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from flywheel.config import ModelConfig, _model_shorthand, _Source, _template_exists
from flywheel.models.rewards.base import Batch, Models, Progress, Source, Verdict
from flywheel.models.rewards.registry import register
from flywheel.models.rewards.rubric import SCORE_LABELS, load_rubric, verdicts


class LLMJudgeSource(_Source):
    """The policy as its own judge, pointwise, with a rubric (Self-Rewarding LMs)."""

    type: Literal["llm_judge"] = "llm_judge"
    # A text file with {question} and {response}; None = Self-Rewarding's additive 5-point rubric.
    template: Path | None = None
    # 0: the expected score under the judge's score distribution; k ≥ 1: the mean of k sampled verdicts.
    samples: int = Field(0, ge=0)
    # CREAM: also judge the candidates with the previous round's policy (source "<name>@previous").
    previous: bool = False
    # The judge's model: None = the policy judges itself (Self-Rewarding); a checkpoint or hub id,
    # or a full model config (e.g. a stronger model behind an OpenAI-compatible server).
    model: ModelConfig | None = None
    _template = field_validator("template")(_template_exists)
    _model = field_validator("model", mode="before")(_model_shorthand)

    @model_validator(mode="after")
    def _previous_needs_policy(self) -> LLMJudgeSource:
        if self.previous and self.model is not None:
            raise ValueError(
                "previous: true ranks with the previous round's policy; it cannot go with a fixed judge `model`"
            )
        return self

    def names(self) -> list[str]:
        return [self.key(), f"{self.key()}@previous"] if self.previous else [self.key()]


class LLMJudge(Source):
    model_based = True

    def __init__(self, spec: LLMJudgeSource, task_source, use_previous: bool = False) -> None:
        super().__init__(spec, task_source)
        self.rubric = load_rubric(spec.template, "pointwise")
        self.use_previous = use_previous
        if use_previous:
            self.name = f"{spec.key()}@previous"

    @classmethod
    def later(cls, spec: LLMJudgeSource, task_source) -> list[Source]:
        return [cls(spec, task_source, use_previous=True)] if spec.previous else []

    def _extra_hash(self) -> str:
        return self.rubric.hash

    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        ref = models.previous if self.use_previous else models.policy
        if ref is None:  # round 1 has no previous policy
            return [Verdict(None, False, None, {"reason": "no previous policy"}) for _ in batch.candidates]
        reps, index = batch.unique()
        engine = models.engine(ref) if self.use_previous else models.judge_engine(self.spec)
        nts = engine.next_token(
            self.rubric,
            [{"question": batch.prompt_of(c)["prompt"], "response": c["response"]} for c in reps],
            SCORE_LABELS,
            batch_size=models.batch_size,
            max_prompt_tokens=models.max_prompt_tokens,
            progress=progress,
        )
        self.judged_by, self.method = engine.describe(), engine.verdict_method
        results = verdicts(nts, self.spec.samples, models.seed)
        out = []
        for i in index:
            r = results[i]
            details = json.loads(r.details) | {"variance": r.variance}
            out.append(Verdict(r.score, r.parse_ok, r.raw, details))
        return out


def health(judged: list[dict], prompts: dict[str, dict]) -> dict[str, float | None]:
    """The mean variance of the judge's score distribution (or its k sampled verdicts)."""
    details = [json.loads(r["details"]) for r in judged if r["details"]]
    variances = [d["variance"] for d in details if d.get("variance") is not None]
    return {"mean_sample_variance": sum(variances) / len(variances) if variances else None}


# A score of 2.5 or more (of 0–5) counts as "good" when compared with the verifier.
register("llm_judge", spec=LLMJudgeSource, source=LLMJudge, threshold=2.5, health=health)
