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
from importlib import resources
from pathlib import Path

import torch

from flywheel.models.sampling import chat_texts

ASSISTANT_MARK = "<|assistant|>"
_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
SCORES = range(0, 6)


def extract_answer(response: str, reference: str | None = None) -> str | None:
    """The final answer in a response: an <answer> tag, else the last number (numeric tasks),
    else the last non-empty line."""
    tag = _ANSWER_TAG.findall(response)
    if tag:
        return tag[-1].strip()
    numeric = reference is None or _NUMBER.fullmatch(reference.strip().replace(" ", "")) is not None
    if numeric:
        nums = _NUMBER.findall(response)
        return nums[-1].replace(",", "") if nums else None
    lines = [ln.strip() for ln in response.splitlines() if ln.strip()]
    return lines[-1] if lines else None


@dataclass(frozen=True)
class Rubric:
    user: str  # user turn, with {question} and {response}
    prefill: str  # start of the judge's own turn, ending right before the score
    hash: str

    def render(self, question: str, response: str) -> tuple[str, str]:
        # str.replace, not str.format: responses contain braces.
        return self.user.replace("{question}", question).replace("{response}", response), self.prefill


class RubricError(ValueError):
    pass


def load_rubric(path: Path | None = None) -> Rubric:
    if path is None:
        text = resources.files("flywheel.models").joinpath("templates/self_rewarding.txt").read_text()
        where = "built-in self_rewarding.txt"
    else:
        path = Path(path)
        if not path.is_file():
            raise RubricError(f"judge template not found: {path}")
        text, where = path.read_text(), str(path)
    for placeholder in ("{question}", "{response}"):
        if placeholder not in text:
            raise RubricError(f"judge template {where} lacks the {placeholder} placeholder")
    user, _, prefill = text.partition(ASSISTANT_MARK)
    # Only newlines are trimmed: the prefill's trailing space matters ("Score: " makes the next token the digit).
    return Rubric(user.strip(), prefill.strip("\n") or "Score: ", hashlib.sha256(text.encode()).hexdigest()[:16])


@dataclass
class JudgeResult:
    score: float | None
    parse_ok: bool
    raw: str
    details: str  # JSON: probability of each score


def _score_token_ids(tokenizer) -> dict[int, list[int]]:
    ids: dict[int, list[int]] = {s: [] for s in SCORES}
    for tok_id in range(len(tokenizer)):
        text = tokenizer.decode([tok_id]).strip()
        if len(text) == 1 and text in "012345":
            ids[int(text)].append(tok_id)
    return ids


@torch.inference_mode()
def llm_judge(model, tokenizer, rubric: Rubric, questions: Sequence[str], responses: Sequence[str], *,
              batch_size: int, max_prompt_tokens: int,
              progress: Callable[[int], None] | None = None) -> list[JudgeResult]:
    score_ids = _score_token_ids(tokenizer)
    all_score_ids = {i for v in score_ids.values() for i in v}
    tokenizer.padding_side = "left"  # every row's last real token sits in the last column
    tokenizer.truncation_side = "left"  # an over-long prompt loses its start, never the "Score:" cue
    rendered = [rubric.render(q, r) for q, r in zip(questions, responses, strict=True)]
    texts = [t + prefill for t, (_, prefill) in zip(chat_texts(tokenizer, [u for u, _ in rendered]), rendered)]
    out: list[JudgeResult] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_tokens, add_special_tokens=False).to(model.device)
        logits = model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1)
        top = probs.argmax(dim=-1).tolist()
        for row, top_id in enumerate(top):
            p = {s: float(probs[row, ids].sum()) for s, ids in score_ids.items()}
            mass = sum(p.values())
            ok = top_id in all_score_ids and mass > 0
            score = sum(s * v for s, v in p.items()) / mass if ok else None
            out.append(JudgeResult(score, ok, tokenizer.decode([top_id]),
                                   json.dumps({"p": {str(k): round(v, 5) for k, v in p.items()},
                                               "score_mass": round(mass, 5)})))
        if progress:
            progress(len(enc["input_ids"]))
    return out
