"""pairwise_judge: the policy (or a judge model) compares two responses in both orders; a verdict
that flips with the order is inconsistent, and no one's win."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from flywheel import seeds
from flywheel.config import ModelConfig, _model_shorthand, _Source, _template_exists
from flywheel.models.rewards.base import Batch, Models, Progress, Source, Verdict
from flywheel.models.rewards.registry import register
from flywheel.models.rewards.rubric import load_rubric


class PairwiseJudgeSource(_Source):
    """The policy compares two responses, asked in both orders; a flip with the order is inconsistent."""

    type: Literal["pairwise_judge"] = "pairwise_judge"
    # A text file with {question}, {response_a} and {response_b}; None = the built-in one.
    template: Path | None = None
    # Each candidate meets this many others of its prompt (a seeded ring; n // 2 = every pair).
    opponents: int = Field(1, ge=1)
    # As for llm_judge: None = the policy; else the judge's own model.
    model: ModelConfig | None = None
    _template = field_validator("template")(_template_exists)
    _model = field_validator("model", mode="before")(_model_shorthand)


def ring_pairs(n: int, opponents: int, rng: random.Random) -> list[tuple[int, int]]:
    """Pairs of 0..n-1 where each meets `opponents` others on a seeded ring (n // 2 = every pair)."""
    order = list(range(n))
    rng.shuffle(order)
    pairs = set()
    for k in range(1, min(opponents, n // 2) + 1):
        for i in range(n):
            a, b = order[i], order[(i + k) % n]
            if a != b:
                pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def pairwise_outcome(first: dict[str, float], second: dict[str, float]) -> str | None:
    """The verdict on (x, y) from its two orders: `first` shows x as A, `second` shows y as A.

    "x" / "y" when both orders prefer the same response, "inconsistent" when the verdict follows
    the position, None when an order gave no verdict at all."""
    v1 = None if first["A"] == first["B"] else ("x" if first["A"] > first["B"] else "y")
    v2 = None if second["A"] == second["B"] else ("y" if second["A"] > second["B"] else "x")
    if v1 is None or v2 is None:
        return None
    return v1 if v1 == v2 else "inconsistent"


def pairwise_scores(n_reps: int, comparisons: Sequence[tuple[int, int, str | None]]) -> list[Verdict]:
    """Per response: consistent wins / comparisons. An inconsistent comparison is no one's win."""
    wins, seen, flips, unparsed = [0] * n_reps, [0] * n_reps, [0] * n_reps, [0] * n_reps
    for a, b, outcome in comparisons:
        for i in (a, b):
            seen[i] += 1
            flips[i] += outcome == "inconsistent"
            unparsed[i] += outcome is None
        if outcome == "x":
            wins[a] += 1
        elif outcome == "y":
            wins[b] += 1
    out = []
    for i in range(n_reps):
        judged = seen[i] - unparsed[i]
        details = {"comparisons": seen[i], "wins": wins[i], "inconsistent": flips[i], "unparsed": unparsed[i]}
        out.append(Verdict(wins[i] / judged if judged else None, judged > 0, None, details))
    return out


class PairwiseJudge(Source):
    model_based = True

    def __init__(self, spec: PairwiseJudgeSource, task_source) -> None:
        super().__init__(spec, task_source)
        self.rubric = load_rubric(spec.template, "pairwise")

    def _extra_hash(self) -> str:
        return self.rubric.hash

    def comparisons(self, batch: Batch, seed: int) -> tuple[list[dict], list[int], list[tuple[int, int]]]:
        reps, index = batch.unique()
        by_prompt: dict[str, list[int]] = {}
        for i, c in enumerate(reps):
            by_prompt.setdefault(c["prompt_id"], []).append(i)
        pairs = []
        for pid, members in sorted(by_prompt.items()):
            for a, b in ring_pairs(len(members), self.spec.opponents, seeds.rng(seed, pid)):
                pairs.append((members[a], members[b]))
        return reps, index, pairs

    def work(self, batch: Batch, seed: int) -> tuple[int, str]:
        return 2 * len(self.comparisons(batch, seed)[2]), "comparisons"  # both orders

    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        reps, index, pairs = self.comparisons(batch, models.seed)
        renders = []
        for a, b in pairs:
            q = batch.prompt_of(reps[a])["prompt"]
            renders.append({"question": q, "response_a": reps[a]["response"], "response_b": reps[b]["response"]})
            renders.append({"question": q, "response_a": reps[b]["response"], "response_b": reps[a]["response"]})
        nts = []
        if renders:
            engine = models.judge_engine(self.spec)
            nts = engine.next_token(
                self.rubric,
                renders,
                ("A", "B"),
                batch_size=models.batch_size,
                max_prompt_tokens=models.max_prompt_tokens,
                progress=progress,
            )
            self.judged_by, self.method = engine.describe(), engine.verdict_method
        outcomes = [(a, b, pairwise_outcome(nts[2 * k].mass, nts[2 * k + 1].mass)) for k, (a, b) in enumerate(pairs)]
        scores = pairwise_scores(len(reps), outcomes)
        return [scores[i] for i in index]


def health(judged: list[dict], prompts: dict[str, dict]) -> dict[str, float | None]:
    """The share of comparisons whose verdict followed the position, not the responses."""
    details = [json.loads(r["details"]) for r in judged if r["details"]]
    comps = sum(d.get("comparisons", 0) for d in details)
    return {"position_bias_rate": sum(d.get("inconsistent", 0) for d in details) / comps if comps else None}


register("pairwise_judge", spec=PairwiseJudgeSource, source=PairwiseJudge, threshold=0.5, health=health)
