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


@lru_cache(maxsize=4)
def _score_token_ids(tokenizer) -> dict[int, list[int]]:
    ids: dict[int, list[int]] = {s: [] for s in SCORES}
    for tok_id in range(len(tokenizer)):
        text = tokenizer.decode([tok_id]).strip()
        if len(text) == 1 and text in "012345":
            ids[int(text)].append(tok_id)
    return ids


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every sequence shares, leaving each at least one token of its own."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(x) for x in seqs) - 1
    for seq in seqs[1:]:
        i = 0
        while i < n and seq[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.inference_mode()
def llm_judge(model, tokenizer, rubric: Rubric, questions: Sequence[str], responses: Sequence[str], *,
              batch_size: int, max_prompt_tokens: int, reuse_prefix: bool = True,
              progress: Callable[[int], None] | None = None) -> list[JudgeResult]:
    """Score every (question, response) with the rubric. With `reuse_prefix`, the rubric's shared
    prefix is run through the model once and its KV cache reused for every batch."""
    import copy

    score_ids = _score_token_ids(tokenizer)
    all_score_ids = {i for v in score_ids.values() for i in v}
    rendered = [rubric.render(q, r) for q, r in zip(questions, responses, strict=True)]
    texts = [t + prefill for t, (_, prefill) in zip(chat_texts(tokenizer, [u for u, _ in rendered]), rendered)]
    # Over-long prompts lose their start, never the "Score:" cue at the end.
    token_ids = [ids[-max_prompt_tokens:] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    # The shared prefix is found on tokens, not text, so it is exactly what the full prompt would hold.
    n_prefix = common_prefix_len(token_ids) if reuse_prefix and len(token_ids) > 1 else 0
    prefix_cache = None
    if n_prefix:
        prefix_ids = torch.tensor([token_ids[0][:n_prefix]], device=model.device)
        prefix_cache = model(input_ids=prefix_ids, use_cache=True).past_key_values
    out: list[JudgeResult] = []
    for start in range(0, len(token_ids), batch_size):
        ids, mask = _left_pad([t[n_prefix:] for t in token_ids[start:start + batch_size]], tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(ids.shape[0])
            full_mask = torch.cat([mask.new_ones(ids.shape[0], n_prefix), mask], dim=1)
            # Positions continue from the prefix and skip the (left) padding, as if each row were alone.
            positions = (n_prefix + mask.cumsum(1) - 1).clamp(min=n_prefix)
            logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                           past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        else:
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False).logits[:, -1].float()
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
            progress(ids.shape[0])
    return out
