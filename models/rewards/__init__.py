"""Reward sources behind one interface: each turns a round's candidates into one verdict per
candidate (score, parse_ok, raw text, details), which the judge stage writes to the judgments
table under the source's name and spec hash. One module per source, each registering its config
spec, class and health figures (registry.py); a plugin package adds its own through the
`flywheel.rewards` entry-point group.

  verifier        the task's checker, exact / numeric match to the reference, a regex, or a callable
  llm_judge       the policy with a pointwise rubric (Self-Rewarding LMs), optionally k sampled verdicts
  pairwise_judge  the policy compares two responses in both orders; an order flip is inconsistent
  majority_vote   label-free self-consistency: agreement with the most common final answer
  self_certainty  label-free: the generation's own mean KL(uniform ‖ p), recorded while sampling
  implicit_reward β·log π_θ(y|x)/π_ref(y|x) of the round's policy vs its DPO reference

Model-based sources judge each distinct (prompt, normalised response) once and share the
verdict among its copies: the exactness of a judge does not depend on how often a sample recurs.
"""

from __future__ import annotations

# The interface first: a plugin imported while the config builds its union (below) finds it here.
from flywheel.models.rewards.base import Batch, Models, Progress, Source, Verdict
from flywheel.models.rewards.registry import Entry, entries, get, register, unregister

# isort: split
# Then the config, whose `judge.sources` union is built from the registry: it loads this package's
# modules (each registers itself) and the plugins, each module finding the config complete.
from flywheel import config as _config  # noqa: F401

# isort: split
from flywheel.errors import RubricError, SourceError
from flywheel.models.rewards.implicit_reward import ImplicitReward
from flywheel.models.rewards.llm_judge import LLMJudge
from flywheel.models.rewards.majority_vote import MajorityVote, extracted_answer
from flywheel.models.rewards.pairwise_judge import PairwiseJudge, pairwise_outcome, pairwise_scores, ring_pairs
from flywheel.models.rewards.self_certainty import SelfCertainty
from flywheel.models.rewards.verifier import Verifier, probe

__all__ = [
    "Batch",
    "Entry",
    "ImplicitReward",
    "LLMJudge",
    "MajorityVote",
    "Models",
    "PairwiseJudge",
    "Progress",
    "SelfCertainty",
    "Source",
    "Verdict",
    "Verifier",
    "build",
    "entries",
    "extracted_answer",
    "get",
    "pairwise_outcome",
    "pairwise_scores",
    "probe",
    "register",
    "ring_pairs",
    "unregister",
]


def build(judge_cfg, task_source) -> list[Source]:
    """Every configured source, in the order the judge stage runs them: cheap first, then the
    ones on the policy, then those on the reference, then the previous policy (fewest model loads)."""
    sources: list[Source] = []
    later: list[Source] = []
    for spec in judge_cfg.sources:
        entry = get(spec.type)
        assert entry is not None  # judge.sources validates against the registered types
        cls = entry.source
        try:
            sources.append(cls(spec, task_source))
            later += cls.later(spec, task_source)
        except RubricError as e:
            raise SourceError(str(e)) from None
    sources.sort(key=lambda s: (s.model_based, s.needs_reference))
    return sources + later
