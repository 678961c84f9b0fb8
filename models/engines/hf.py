"""The `hf` engine: transformers in this process (models/hf/decode.py's continuous batching), on the
CPU or one GPU. Importing it loads torch and transformers, so the registry imports it only when an
hf engine opens."""

from __future__ import annotations

import gc

import torch

from flywheel.models import loading
from flywheel.models.engines.base import Engine
from flywheel.models.hf import sampling, scoring


class HFEngine(Engine):
    name = "hf"

    def __init__(self, ref: str, dtype: str = "auto") -> None:
        super().__init__(ref)
        self.model, self.tokenizer = loading.load(ref, dtype)

    def sample(self, prompts, *, n, max_new_tokens, temperature, top_p, seed, batch_size, progress=None):
        with loading.attention_backends():
            return sampling.generate(
                self.model,
                self.tokenizer,
                prompts,
                n=n,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                progress=progress,
            )

    def greedy(self, prompts, *, max_new_tokens, batch_size, progress=None):
        with loading.attention_backends():
            return sampling.generate(
                self.model,
                self.tokenizer,
                prompts,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                do_sample=False,
                progress=progress,
            )

    def next_token(self, rubric, renders, labels, *, batch_size, max_prompt_tokens, by_question=True, progress=None):
        with loading.attention_backends():
            return scoring.next_token(
                self.model,
                self.tokenizer,
                rubric,
                renders,
                labels,
                batch_size=batch_size,
                max_prompt_tokens=max_prompt_tokens,
                by_question=by_question,
                progress=progress,
            )

    def sequence_logprobs(self, prompts, responses, *, batch_size, progress=None):
        with loading.attention_backends():
            return scoring.sequence_logprobs(
                self.model, self.tokenizer, prompts, responses, batch_size=batch_size, progress=progress
            )

    def close(self) -> None:
        self.model = self.tokenizer = None
        loading.load.cache_clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def open_hf(model_cfg, ref: str) -> HFEngine:
    return HFEngine(ref, model_cfg.dtype)
