"""What every engine returns, and how every engine renders a prompt: plain data and the model's own
chat template, no backend. It sits below the engines so that the hf engine's decoder, sampler and
judge (models/hf/decode.py, sampling.py, judges.py) build on it without importing the engines that
call them: dependencies point one way, engines → sampling / judges → generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Progress = Callable[[int], None] | None


@dataclass
class Generation:
    response: str
    n_tokens: int
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)
    mean_logprob: float | None
    self_certainty: float | None


@dataclass
class NextToken:
    mass: dict[str, float]  # probability of each label's tokens at the verdict position
    top: str  # the most likely token over the whole vocabulary (or the most frequent draw), decoded


def chat_texts(tokenizer, prompts: Sequence[str]) -> list[str]:
    if tokenizer.chat_template:
        return [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    return list(prompts)


def rendered_prompts(tokenizer, rubric, renders: Sequence[dict[str, str]], max_prompt_tokens: int) -> list[list[int]]:
    """Each rubric prompt as token ids: chat template, the judge's turn pre-filled up to the verdict
    cue; an over-long prompt loses its start, never the cue at its end."""
    rendered = [rubric.render(**r) for r in renders]
    texts = [t + prefill for t, (_, prefill) in zip(chat_texts(tokenizer, [u for u, _ in rendered]), rendered)]
    return [ids[-max_prompt_tokens:] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
