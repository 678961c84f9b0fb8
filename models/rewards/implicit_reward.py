"""implicit_reward: β·log π_θ(y|x)/π_ref(y|x) of the round's policy vs its DPO reference."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from flywheel.config import _Source
from flywheel.models.rewards.base import Batch, Models, Progress, Source, Verdict
from flywheel.models.rewards.registry import register


class ImplicitRewardSource(_Source):
    """DPO's implicit reward β·log π_θ(y|x)/π_ref(y|x) of the round's policy vs its DPO reference."""

    type: Literal["implicit_reward"] = "implicit_reward"
    beta: float = Field(0.1, gt=0)


class ImplicitReward(Source):
    model_based = True
    needs_reference = True

    def work(self, batch: Batch, seed: int) -> tuple[int, str]:
        return 2 * len(batch.unique()[0]), "sequences"  # under the policy, then the reference

    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        if models.reference is None or models.reference == models.policy:
            # round 1's policy is the base model: it has no DPO reference, so no implicit reward
            return [Verdict(None, False, None, {"reason": "the policy has no DPO reference"}) for _ in batch.candidates]
        reps, index = batch.unique()
        prompts, responses = [batch.prompt_of(c)["prompt"] for c in reps], [c["response"] for c in reps]
        logps = {}
        for which, ref in (("policy", models.policy), ("reference", models.reference)):
            engine = models.engine(ref)
            logps[which] = engine.sequence_logprobs(prompts, responses, batch_size=models.batch_size, progress=progress)
            self.judged_by, self.method = engine.describe(), "sequence_logprobs"
        beta = self.spec.beta
        out = []
        for i in index:
            lp, lr = logps["policy"][i], logps["reference"][i]
            score = beta * (lp - lr) if math.isfinite(lp) and math.isfinite(lr) else None
            out.append(Verdict(score, score is not None, None, {"logp_policy": lp, "logp_reference": lr}))
        return out


register("implicit_reward", spec=ImplicitRewardSource, source=ImplicitReward)
