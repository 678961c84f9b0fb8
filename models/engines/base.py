"""What a stage may ask of a model, whatever runs it:

    sample(prompts, n, …)        n completions per prompt, prompt-major, per-sample seeds   (generate)
    greedy(prompts, …)           one greedy completion per prompt                            (benchmark)
    next_token(rubric, renders)  next-token probability of each label after the rubric's cue (LLM / pairwise judge)
    sequence_logprobs(p, r)      log π(r | p), teacher-forced                                (implicit reward)
    close()                      free what the engine holds (the GPU, a connection pool)

Prompts are rendered with the model's own chat template by every backend (models/generation.py),
so the same prompt reaches every engine as the same text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from flywheel import hashing
from flywheel.errors import EngineError
from flywheel.models.generation import Generation, NextToken, Progress


class Settings(BaseModel):
    """An engine's own block of a model config (`vllm:`, `openai:`, a plugin's): unknown keys are
    errors and assignments are checked, as everywhere in the config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def hashed(self, dumped: dict[str, Any]) -> dict[str, Any]:
        """The block as the config's hash sees it: its fields' NOT_HASHED / HASHED_UNLESS_DEFAULT marks
        (flywheel/hashing.py); the registration's `speed_only` is applied by the model config."""
        return hashing.hashed(self, dumped)


class Engine:
    """The interface every backend implements. `describe` names the model as judge health records it."""

    name = "engine"
    # how next_token reads a verdict: "distribution" (the full softmax), "top_logprobs" (the
    # server's top-k log-probs: a label outside the top k counts 0), or "sampled_<k>" (k sampled verdicts)
    verdict_method = "distribution"

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def describe(self) -> str:
        return f"{self.name}:{self.ref}"

    def sample(
        self,
        prompts: Sequence[str],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        batch_size: int,
        progress: Progress = None,
    ) -> list[Generation]:
        raise EngineError(f"engine {self.name} cannot sample")

    def greedy(
        self, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int, progress: Progress = None
    ) -> list[Generation]:
        raise EngineError(f"engine {self.name} cannot generate greedily")

    def next_token(
        self,
        rubric,
        renders: Sequence[dict[str, str]],
        labels: Sequence[str],
        *,
        batch_size: int,
        max_prompt_tokens: int,
        by_question: bool = True,
        progress: Progress = None,
    ) -> list[NextToken]:
        raise EngineError(f"engine {self.name} cannot read a judge's verdict (next-token probabilities)")

    def sequence_logprobs(
        self, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int, progress: Progress = None
    ) -> list[float]:
        raise EngineError(f"engine {self.name} cannot score given responses (sequence log-probs); use hf or vllm")

    def close(self) -> None:
        pass


def label_mass(top: dict[str, float], labels: Sequence[str]) -> NextToken:
    """Top-k {token text: log-prob} → each label's probability ("3" and " 3" both count as "3")
    and the most likely token. For every backend that reads verdicts from top-k log-probs."""
    mass = {label: 0.0 for label in labels}
    for text, lp in top.items():
        key = text.strip()
        if key in mass and lp is not None and math.isfinite(lp):
            mass[key] += math.exp(lp)
    best = max(top, key=lambda t: top[t]) if top else ""
    return NextToken(mass, best)


def checkpoint_ref(model_cfg) -> str:
    """A model config's `name` as from_pretrained takes it (a local checkpoint or a hub id), checked
    to exist: what an engine that loads weights opens."""
    from flywheel.models import loading  # torch loads here, when a checkpoint is resolved, not on import

    return loading.resolve(model_cfg.name)


def check_checkpoint(model_cfg, *, policy: bool) -> None:
    """The preflight of an engine that loads weights: a judge's own model exists before any work (the
    policy is resolved by the flow itself, after its other checks)."""
    if not policy:
        checkpoint_ref(model_cfg)
