"""self_certainty: label-free, the generation's own mean KL(uniform ‖ p), recorded while sampling."""

from __future__ import annotations

from typing import Literal

from flywheel.config import _Source
from flywheel.models.rewards.base import Batch, Models, Progress, Source, Verdict, report
from flywheel.models.rewards.registry import register


class SelfCertaintySource(_Source):
    """Label-free: mean KL(uniform ‖ policy) over the response's tokens, recorded during generation."""

    type: Literal["self_certainty"] = "self_certainty"

    def engine_problem(self, engine: str) -> str | None:
        if engine == "hf":
            return None
        return (
            f"judge source {self.key()!r} (self_certainty) needs the full next-token distribution at every "
            f"sampled token, and engine {engine} returns top-k log-probs only: use model.engine: hf, or drop "
            "self_certainty"
        )


class SelfCertainty(Source):
    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        return report(
            progress, [Verdict(c.get("self_certainty"), c.get("self_certainty") is not None) for c in batch.candidates]
        )


register("self_certainty", spec=SelfCertaintySource, source=SelfCertainty)
