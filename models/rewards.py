"""Reward sources behind one interface: each turns a round's candidates into one verdict per
candidate (score, parse_ok, raw text, details), which the judge stage writes to the judgments
table under the source's name and spec hash.

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

import hashlib
import importlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flywheel import config as C
from flywheel.errors import SourceError
from flywheel.models import judges

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
    """Model refs a source may need, opened on demand as engines (models/engines.py: one open at a time)."""
    policy: str
    previous: str | None = None  # the previous round's policy (CREAM's second ranking)
    reference: str | None = None  # the DPO reference the policy was trained against
    dtype: str = "auto"
    batch_size: int = 16
    max_prompt_tokens: int = 1024
    seed: int = 0
    model: C.ModelConfig | None = None  # how the policy runs (engine, dtype); None: hf with `dtype`

    def engine(self, ref: str):
        """An engine on one of the policy's lineage (policy, previous, reference)."""
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
    judged_by: str | None = None  # the model that judged (engine:ref), recorded in judge health
    method: str | None = None  # how a model-based verdict was read (engines.Engine.verdict_method)

    def __init__(self, spec, task_source) -> None:
        self.spec, self.name = spec, spec.key()
        self.task_source = task_source

    @property
    def spec_hash(self) -> str:
        spec = self.spec.model_dump(mode="json")
        if spec.get("min_vote_share", 1) == 0:
            spec.pop("min_vote_share")  # the default: the same hash as before the filter existed
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()
                              + self._extra_hash().encode()).hexdigest()[:16]

    def _extra_hash(self) -> str:
        return ""

    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        raise NotImplementedError

    def work(self, batch: Batch, seed: int) -> tuple[int, str]:
        """How many units `judge` will report progress in, and their name."""
        if self.model_based:  # identical responses are judged once
            return len(batch.unique()[0]), "candidates"
        return len(batch.candidates), "candidates"


def _numeric(x: str) -> float | None:
    try:
        return float(x.replace(",", "").strip())
    except (ValueError, AttributeError):
        return None


class Verifier(Source):
    cheap_decider = True

    def __init__(self, spec: C.VerifierSource, task_source) -> None:
        super().__init__(spec, task_source)
        self.fn = _import_callable(spec.callable) if spec.match == "callable" else None

    def _extra_hash(self) -> str:
        return self.spec.callable or ""

    def check(self, prompt: str, response: str, answer: str | None, metadata: dict) -> Verdict:
        m = self.spec.match
        if m == "callable":
            try:
                score = self.fn(prompt, response, answer, metadata)
            except Exception as e:  # noqa: BLE001 - the user's code; kept as an unparsed verdict
                return Verdict(None, False, f"{type(e).__name__}: {e}"[:500], {"error": True})
            if score is not None and not isinstance(score, (int, float)):
                return Verdict(None, False, f"returned {type(score).__name__}, not a number", {"error": True})
            return Verdict(None if score is None else float(score), score is not None, None)
        extracted = judges.extract_answer(response, answer)
        if m == "task":
            score = self.task_source.score(extracted, answer, metadata)
            return Verdict(score, score is not None, extracted)
        if answer is None:
            return Verdict(None, False, extracted, {"reason": "no reference answer"})
        if m == "regex":
            pattern = self.spec.pattern.replace("{answer}", re.escape(answer.strip()))
            return Verdict(float(re.search(pattern, response) is not None), True, extracted)
        if extracted is None:
            return Verdict(0.0, True, None)
        if m == "numeric":
            a, b = _numeric(extracted), _numeric(answer)
            ok = a is not None and b is not None and abs(a - b) <= self.spec.tolerance
            return Verdict(float(ok), True, extracted)
        return Verdict(float(" ".join(extracted.lower().split()) == " ".join(answer.lower().split())), True, extracted)

    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        out = []
        for c in batch.candidates:
            p = batch.prompt_of(c)
            out.append(self.check(p["prompt"], c["response"], p["answer"], json.loads(p["metadata"] or "{}")))
        if progress:
            progress(len(out))
        return out


def _import_callable(ref: str):
    module, _, name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SourceError(f"verifier callable {ref!r} cannot be imported ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise SourceError(f"verifier callable {ref!r} is not callable")
    return fn


def extracted_answer(response: str, reference: str | None) -> str | None:
    a = judges.extract_answer(response, reference)
    if a is None:
        return None
    n = _numeric(a)
    return (f"{n:g}" if n is not None else " ".join(a.lower().split()))


class MajorityVote(Source):
    cheap_decider = True

    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        by_prompt: dict[str, list[tuple[int, str | None]]] = {}
        for c in batch.candidates:
            # The reference only tells numeric from text answers; its value is never looked at.
            by_prompt.setdefault(c["prompt_id"], []).append(
                (c["sample_index"], extracted_answer(c["response"], batch.prompt_of(c)["answer"])))
        labels: dict[str, tuple[str | None, float]] = {}
        for pid, answers in by_prompt.items():
            votes = Counter(a for _, a in answers if a is not None)
            if not votes:
                labels[pid] = (None, 0.0)
                continue
            first = {}
            for idx, a in sorted(answers, key=lambda t: t[0]):
                first.setdefault(a, idx)
            # most votes; a tie goes to the answer sampled first
            label = min(votes, key=lambda a: (-votes[a], first[a]))
            labels[pid] = (label, votes[label] / len(answers))
        out = []
        for c in batch.candidates:
            label, share = labels[c["prompt_id"]]
            mine = extracted_answer(c["response"], batch.prompt_of(c)["answer"])
            details = {"label": label, "vote_share": round(share, 4)}
            confident = share >= self.spec.min_vote_share
            out.append(Verdict(None if mine is None or label is None or not confident else float(mine == label),
                               mine is not None, mine, details))
        if progress:
            progress(len(out))
        return out


class SelfCertainty(Source):
    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        out = [Verdict(c.get("self_certainty"), c.get("self_certainty") is not None) for c in batch.candidates]
        if progress:
            progress(len(out))
        return out


class LLMJudge(Source):
    model_based = True

    def __init__(self, spec: C.LLMJudgeSource, task_source, use_previous: bool = False) -> None:
        super().__init__(spec, task_source)
        self.rubric = judges.load_rubric(spec.template, "pointwise")
        self.use_previous = use_previous
        if use_previous:
            self.name = f"{spec.key()}@previous"

    def _extra_hash(self) -> str:
        return self.rubric.hash

    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        ref = models.previous if self.use_previous else models.policy
        if ref is None:  # round 1 has no previous policy
            return [Verdict(None, False, None, {"reason": "no previous policy"}) for _ in batch.candidates]
        reps, index = batch.unique()
        engine = models.engine(ref) if self.use_previous else models.judge_engine(self.spec)
        nts = engine.next_token(self.rubric, [{"question": batch.prompt_of(c)["prompt"], "response": c["response"]}
                                              for c in reps], judges.SCORE_LABELS, batch_size=models.batch_size,
                                max_prompt_tokens=models.max_prompt_tokens, progress=progress)
        self.judged_by, self.method = engine.describe(), engine.verdict_method
        results = judges.verdicts(nts, self.spec.samples, models.seed)
        out = []
        for i in index:
            r = results[i]
            details = json.loads(r.details) | {"variance": r.variance}
            out.append(Verdict(r.score, r.parse_ok, r.raw, details))
        return out


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

    def __init__(self, spec: C.PairwiseJudgeSource, task_source) -> None:
        super().__init__(spec, task_source)
        self.rubric = judges.load_rubric(spec.template, "pairwise")

    def _extra_hash(self) -> str:
        return self.rubric.hash

    def comparisons(self, batch: Batch, seed: int) -> tuple[list[dict], list[int], list[tuple[int, int]]]:
        reps, index = batch.unique()
        by_prompt: dict[str, list[int]] = {}
        for i, c in enumerate(reps):
            by_prompt.setdefault(c["prompt_id"], []).append(i)
        pairs = []
        for pid, members in sorted(by_prompt.items()):
            for a, b in ring_pairs(len(members), self.spec.opponents, random.Random(f"{seed}:{pid}")):
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
            nts = engine.next_token(self.rubric, renders, ("A", "B"), batch_size=models.batch_size,
                                    max_prompt_tokens=models.max_prompt_tokens, progress=progress)
            self.judged_by, self.method = engine.describe(), engine.verdict_method
        outcomes = [(a, b, pairwise_outcome(nts[2 * k].mass, nts[2 * k + 1].mass)) for k, (a, b) in enumerate(pairs)]
        scores = pairwise_scores(len(reps), outcomes)
        return [scores[i] for i in index]


class ImplicitReward(Source):
    model_based = True

    def work(self, batch: Batch, seed: int) -> tuple[int, str]:
        return 2 * len(batch.unique()[0]), "sequences"  # under the policy, then the reference

    def judge(self, batch: Batch, models: Models, progress: Progress | None = None) -> list[Verdict]:
        if models.reference is None or models.reference == models.policy:
            # round 1's policy is the base model: it has no DPO reference, so no implicit reward
            return [Verdict(None, False, None, {"reason": "the policy has no DPO reference"})
                    for _ in batch.candidates]
        reps, index = batch.unique()
        prompts, responses = [batch.prompt_of(c)["prompt"] for c in reps], [c["response"] for c in reps]
        logps = {}
        for which, ref in (("policy", models.policy), ("reference", models.reference)):
            engine = models.engine(ref)
            logps[which] = engine.sequence_logprobs(prompts, responses, batch_size=models.batch_size,
                                                    progress=progress)
            self.judged_by, self.method = engine.describe(), "sequence_logprobs"
        beta = self.spec.beta
        out = []
        for i in index:
            lp, lr = logps["policy"][i], logps["reference"][i]
            score = beta * (lp - lr) if math.isfinite(lp) and math.isfinite(lr) else None
            out.append(Verdict(score, score is not None, None, {"logp_policy": lp, "logp_reference": lr}))
        return out


def build(judge_cfg: C.JudgeConfig, task_source) -> list[Source]:
    """Every configured source, in the order the judge stage runs them: cheap first, then the
    ones on the policy, then the previous policy (fewest model loads)."""
    kinds = {"verifier": Verifier, "majority_vote": MajorityVote, "self_certainty": SelfCertainty,
             "llm_judge": LLMJudge, "pairwise_judge": PairwiseJudge, "implicit_reward": ImplicitReward}
    sources: list[Source] = []
    later: list[Source] = []
    for spec in judge_cfg.sources:
        try:
            sources.append(kinds[spec.type](spec, task_source))
            if isinstance(spec, C.LLMJudgeSource) and spec.previous:
                later.append(LLMJudge(spec, task_source, use_previous=True))
        except judges.RubricError as e:
            raise SourceError(str(e)) from None
    sources.sort(key=lambda s: (s.model_based, isinstance(s, ImplicitReward)))
    return sources + later


def probe(sources: Sequence[Source], prompt: str, answer: str | None, metadata: dict) -> None:
    """Run every callable verifier once on a known item before any generation: one that raises
    fails the run now, with its name, instead of after an hour of sampling."""
    for s in sources:
        if isinstance(s, Verifier) and s.spec.match == "callable":
            v = s.check(prompt, answer or "", answer, metadata)
            if v.details.get("error"):
                raise SourceError(f"verifier callable {s.spec.callable!r} failed on a probe item: {v.raw}")
