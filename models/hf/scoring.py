"""The `hf` engine's scoring: a rendered rubric's next-token label probabilities (the LLM judge's
verdict position) and a response's summed log-probability under the model (the implicit reward),
each by teacher-forced forward passes, shared prefixes computed once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, cast

import torch

from flywheel.models.generation import NextToken, chat_texts, rendered_prompts
from flywheel.models.hf import decode

if TYPE_CHECKING:
    from flywheel.models.rewards.rubric import Rubric


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

    With `reuse_prefix`, every shared prefix is computed once (models/hf/decode.py: last_logits): the
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
