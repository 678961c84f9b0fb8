"""majority_vote: label-free self-consistency, agreement with the most common final answer."""

from __future__ import annotations

import json
from collections import Counter
from typing import Literal

from pydantic import Field

from flywheel.config import HASHED_UNLESS_DEFAULT, _Source
from flywheel.models.rewards.base import Batch, Models, Progress, Source, Verdict, report
from flywheel.models.rewards.registry import register
from flywheel.models.tasks.base import extract_answer, numeric


class MajorityVoteSource(_Source):
    """Label-free self-consistency: agreement with the most common final answer among the samples."""

    type: Literal["majority_vote"] = "majority_vote"
    # TTRL-style confidence filter: a prompt whose most common answer holds less than this share of
    # its samples gets no scores (NULL: it yields no pair), since its pseudo-label is least often right.
    min_vote_share: float = Field(0.0, ge=0, le=1, json_schema_extra=HASHED_UNLESS_DEFAULT)


def extracted_answer(response: str, reference: str | None) -> str | None:
    """A response's final answer, normalised: numbers as %g, text lower-cased with single spaces."""
    a = extract_answer(response, reference)
    if a is None:
        return None
    n = numeric(a)
    return f"{n:g}" if n is not None else " ".join(a.lower().split())


class MajorityVote(Source):
    cheap_decider = True

    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        labels = self._labels(batch)
        out = []
        for c in batch.candidates:
            label, share = labels[c["prompt_id"]]
            mine = extracted_answer(c["response"], batch.prompt_of(c)["answer"])
            details = {"label": label, "vote_share": round(share, 4)}
            confident = share >= self.spec.min_vote_share
            out.append(
                Verdict(
                    None if mine is None or label is None or not confident else float(mine == label),
                    mine is not None,
                    mine,
                    details,
                )
            )
        return report(progress, out)

    @staticmethod
    def _labels(batch: Batch) -> dict[str, tuple[str | None, float]]:
        """Per prompt: the most common answer (a tie goes to the one sampled first) and its share."""
        by_prompt: dict[str, list[tuple[int, str | None]]] = {}
        for c in batch.candidates:
            # The reference only tells numeric from text answers; its value is never looked at.
            by_prompt.setdefault(c["prompt_id"], []).append(
                (c["sample_index"], extracted_answer(c["response"], batch.prompt_of(c)["answer"]))
            )
        labels: dict[str, tuple[str | None, float]] = {}
        for pid, answers in by_prompt.items():
            votes = Counter(a for _, a in answers if a is not None)
            if not votes:
                labels[pid] = (None, 0.0)
                continue
            first: dict[str | None, int] = {}
            for idx, a in sorted(answers, key=lambda t: t[0]):
                first.setdefault(a, idx)
            label = min(votes, key=lambda a: (-votes[a], first[a]))
            labels[pid] = (label, votes[label] / len(answers))
        return labels


def health(judged: list[dict], prompts: dict[str, dict]) -> dict[str, float | None]:
    """How often the pseudo-label was the reference answer, on prompts that have one."""
    labels = {r["prompt_id"]: json.loads(r["details"] or "{}").get("label") for r in judged}
    known = [(pid, lab) for pid, lab in labels.items() if prompts[pid]["answer"] is not None]
    right = [lab == extracted_answer(prompts[pid]["answer"], prompts[pid]["answer"]) for pid, lab in known]
    return {"pseudo_label_accuracy": sum(right) / len(right) if right else None}


register("majority_vote", spec=MajorityVoteSource, source=MajorityVote, threshold=0.5, health=health)
