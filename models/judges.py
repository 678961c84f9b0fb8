"""Reward sources: the task's verifier and the policy's own LLM-as-a-judge.

The LLM judge uses Self-Rewarding LMs' additive 5-point rubric. Instead of sampling a
justification and parsing "Score: N" out of it, the judge's turn is pre-filled up to
"Score:" and the score is read from one forward pass: the distribution over the tokens
"0".."5" at that position (G-Eval style expected score). The judge "parsed" when its most
likely next token over the whole vocabulary is a score digit; otherwise the score is NULL
and the raw top token is kept, so failures are counted, never hidden.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import cast

import torch

from flywheel.errors import RubricError
from flywheel.models import decode
from flywheel.models.generation import NextToken, rendered_prompts
from flywheel.models.sampling import chat_texts
from flywheel.models.tasks.base import extract_answer  # noqa: F401 - where the judges' callers look for it

ASSISTANT_MARK = "<|assistant|>"
SCORES = range(6)


@dataclass(frozen=True)
class Rubric:
    user: str  # user turn, with {question} and {response} (pointwise) or {response_a} and {response_b} (pairwise)
    prefill: str  # start of the judge's own turn, ending right before the verdict
    hash: str

    def render(self, question: str, **responses: str) -> tuple[str, str]:
        """The user turn with each placeholder replaced once, in one pass over the template: an
        inserted text is never searched again, so a question or response that holds "{response}"
        or braces of its own arrives verbatim (str.format would choke on its braces)."""
        values = {"question": question, **responses}
        pattern = "|".join(re.escape("{" + key + "}") for key in values)
        return re.sub(pattern, lambda m: values[m.group()[1:-1]], self.user), self.prefill


PLACEHOLDERS = {"pointwise": ("{question}", "{response}"), "pairwise": ("{question}", "{response_a}", "{response_b}")}
BUILTIN = {"pointwise": "self_rewarding.txt", "pairwise": "pairwise.txt"}


def load_rubric(path: Path | None = None, kind: str = "pointwise") -> Rubric:
    if path is None:
        text = resources.files("flywheel.models").joinpath(f"templates/{BUILTIN[kind]}").read_text()
        where = f"built-in {BUILTIN[kind]}"
    else:
        path = Path(path)
        if not path.is_file():
            raise RubricError(f"judge template not found: {path}")
        text, where = path.read_text(), str(path)
    for placeholder in PLACEHOLDERS[kind]:
        if placeholder not in text:
            raise RubricError(f"judge template {where} lacks the {placeholder} placeholder")
    user, mark, prefill = text.partition(ASSISTANT_MARK)
    # Only newlines are trimmed: the prefill's trailing space matters ("Score: " makes the next token the digit).
    prefill = prefill.strip("\n")
    if not mark or not prefill.strip():
        raise RubricError(
            f"judge template {where} lacks the verdict cue: a line '{ASSISTANT_MARK}' followed by "
            "the start of the judge's answer, right before the score (e.g. 'Score: ')"
        )
    return Rubric(user.strip(), prefill, hashlib.sha256(text.encode()).hexdigest()[:16])


@dataclass
class JudgeResult:
    score: float | None
    parse_ok: bool
    raw: str
    details: str  # JSON: probability of each score (and the sampled verdicts, if any)
    variance: float | None = None


def token_groups(tokenizer, labels: Sequence[str]) -> dict[str, list[int]]:
    """Token ids whose text (stripped) is exactly each label: "3" and " 3" both count as "3"."""
    return _token_groups(tokenizer, tuple(labels))


@lru_cache(maxsize=8)
def _token_groups(tokenizer, labels: tuple[str, ...]) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {label: [] for label in labels}
    for tok_id in range(len(tokenizer)):
        text = tokenizer.decode([tok_id]).strip()
        if text in ids:
            ids[text].append(tok_id)
    return ids


@torch.inference_mode()
def next_token(
    model,
    tokenizer,
    rubric: Rubric,
    renders: Sequence[dict[str, str]],
    labels: Sequence[str],
    *,
    batch_size: int,
    max_prompt_tokens: int,
    reuse_prefix: bool = True,
    by_question: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[NextToken]:
    """One forward pass per rendered rubric: the next-token probability of each label after the prefill.

    With `reuse_prefix`, every shared prefix is computed once (models/decode.py: last_logits): the
    rubric's start once for all, each question's part once for its candidates (`by_question`);
    without it, every prompt is run whole (the reference the shared path is tested against)."""
    groups = token_groups(tokenizer, labels)
    token_ids = rendered_prompts(tokenizer, rubric, renders, max_prompt_tokens)  # as every engine renders them
    out: list[NextToken | None] = [None] * len(token_ids)

    def read(rows: Sequence[int], logits: torch.Tensor) -> None:
        probs = torch.softmax(logits.float(), dim=-1)
        for k, (row, top_id) in enumerate(zip(rows, probs.argmax(dim=-1).tolist())):
            out[row] = NextToken(
                {label: float(probs[k, g].sum()) for label, g in groups.items()}, tokenizer.decode([top_id])
            )

    if reuse_prefix:
        # The shared prefixes are found on tokens, not text: exactly what the full prompts hold.
        keys = [r.get("question") if by_question else None for r in renders]
        for rows, logits in decode.last_logits(
            model, token_ids, keys, batch_size=batch_size, pad_id=tokenizer.pad_token_id, progress=progress
        ):
            read(rows, logits)
        return cast("list[NextToken]", out)  # every row read
    for start in range(0, len(token_ids), batch_size):
        ids, mask = decode.left_pad(token_ids[start : start + batch_size], tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False).logits[:, -1]
        read(list(range(start, start + ids.shape[0])), logits)
        if progress:
            progress(ids.shape[0])
    return cast("list[NextToken]", out)  # every row read


SCORE_LABELS = tuple(str(s) for s in SCORES)


def pointwise_verdict(nt: NextToken, samples: int = 0, rng=None) -> JudgeResult:
    """A rubric score from the judge's next-token distribution.

    samples = 0: the expected score (G-Eval); the judge "parsed" when its most likely token over
    the whole vocabulary is a score digit. samples = k: k verdicts drawn from the full
    distribution (exactly what k sampled judge turns would start with); a draw that is not a
    digit is an unparsed verdict, the score is the mean of the parsed ones, their variance kept."""
    p = {int(k): v for k, v in nt.mass.items()}
    mass = sum(p.values())
    info: dict = {"p": {str(k): round(v, 5) for k, v in p.items()}, "score_mass": round(mass, 5)}
    if samples == 0:
        ok = nt.top.strip() in SCORE_LABELS and mass > 0
        mean: float | None = None
        var: float | None = None
        if ok:
            mean = sum(s * v for s, v in p.items()) / mass
            var = sum((s - mean) ** 2 * v for s, v in p.items()) / mass
        return JudgeResult(mean, ok, nt.top, json.dumps(info), var)
    outcomes = [*p, -1]  # -1: any other token
    weights = [*p.values(), max(0.0, 1.0 - mass)]
    draws = rng.choices(outcomes, weights=weights, k=samples)
    parsed = [d for d in draws if d >= 0]
    info["draws"] = draws
    if not parsed:
        return JudgeResult(None, False, nt.top, json.dumps(info), None)
    mean = sum(parsed) / len(parsed)
    var = sum((d - mean) ** 2 for d in parsed) / len(parsed)
    return JudgeResult(mean, True, ",".join(map(str, draws)), json.dumps(info), var)


def verdicts(nts: Sequence[NextToken], samples: int, seed: int) -> list[JudgeResult]:
    """Rubric scores from next-token distributions; one seeded generator per candidate position,
    so a sampled verdict does not depend on its batch neighbours."""
    import random

    return [pointwise_verdict(nt, samples, random.Random(f"{seed}:{i}")) for i, nt in enumerate(nts)]


def llm_judge(
    model,
    tokenizer,
    rubric: Rubric,
    questions: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int,
    max_prompt_tokens: int,
    reuse_prefix: bool = True,
    by_question: bool = True,
    samples: int = 0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[JudgeResult]:
    """Score every (question, response) with the pointwise rubric."""
    nts = next_token(
        model,
        tokenizer,
        rubric,
        [{"question": q, "response": r} for q, r in zip(questions, responses, strict=True)],
        SCORE_LABELS,
        batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens,
        reuse_prefix=reuse_prefix,
        by_question=by_question,
        progress=progress,
    )
    return verdicts(nts, samples, seed)


@torch.inference_mode()
def sequence_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """log π(response | prompt) summed over the response's tokens (chat-formatted prompt, teacher-forced)."""
    heads = chat_texts(tokenizer, prompts)
    out: list[float] = []
    for start in range(0, len(heads), batch_size):
        rows, spans = [], []
        for head, resp in zip(heads[start : start + batch_size], responses[start : start + batch_size]):
            h = tokenizer(head, add_special_tokens=False)["input_ids"]
            r = tokenizer(resp, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(h + r)
            spans.append(len(r))
        ids, mask = decode.left_pad(rows, tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logp = torch.log_softmax(
            model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].float(), -1
        )
        tok = logp.gather(2, ids[:, 1:, None]).squeeze(2)
        for i, n in enumerate(spans):
            out.append(float(tok[i, -n:].sum()))
        if progress:
            progress(len(rows))
    return out
