"""Straightforward implementations that the fast paths are checked and measured against: transformers'
own `generate()` for the decoder (tests/integration/test_decode_generation_config.py,
benchmarks/round.py) and the pointwise judge run whole, one prompt at a time. No stage calls them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from flywheel.models.generation import Generation, chat_texts
from flywheel.models.hf import decode
from flywheel.models.hf.scoring import next_token
from flywheel.models.rewards.rubric import SCORE_LABELS, JudgeResult, Rubric, verdicts


class _TokenStats(LogitsProcessor):
    def __init__(self) -> None:
        self.prev_logp: torch.Tensor | None = None
        self.chosen_logp: list[torch.Tensor] = []
        self.certainty: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev_logp is not None:
            self.chosen_logp.append(self.prev_logp.gather(1, input_ids[:, -1:]).squeeze(1))
        logp = torch.log_softmax(scores.float(), dim=-1)
        # self-certainty = KL(U || p) = -log V - mean_j log p_j  (Kang et al., 2025)
        self.certainty.append(-math.log(logp.shape[-1]) - logp.mean(dim=-1))
        self.prev_logp = logp
        return scores

    def finish(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prev_logp is not None:
            self.chosen_logp.append(self.prev_logp.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.chosen_logp, 1), torch.stack(self.certainty, 1)


# The sampling warpers a checkpoint's generation_config may set that the decoder leaves off (it samples
# the config's temperature and top_p from the plain distribution): the reference turns them off too.
PLAIN = {"top_k": None, "min_p": None, "typical_p": None, "epsilon_cutoff": None, "eta_cutoff": None, "top_h": None}


@torch.inference_mode()
def generate_reference(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """transformers' own `generate()`, one generation per entry of `prompts` (repeat a prompt to
    sample it N times), seeded per batch. The reference `generate` is measured and checked against
    (benchmarks/round.py), not used by the stages."""
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so every row ends at the same column
    texts = chat_texts(tokenizer, prompts)
    eos_ids = decode.stop_ids(model, tokenizer.eos_token_id, tokenizer.pad_token_id)  # the decoder's stop tokens
    out: list[Generation] = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        torch.manual_seed(seed + start)  # seed per batch start: reruns with the same batch size reproduce
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        stats = _TokenStats()
        warp = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        seqs = model.generate(
            **enc,
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(eos_ids),
            logits_processor=LogitsProcessorList([stats]),
            **PLAIN,
            **warp,
        )
        new = seqs[:, enc["input_ids"].shape[1] :]
        logp, cert = stats.finish(new[:, -1])
        for row in range(new.shape[0]):
            toks = new[row].tolist()
            stop = next((i for i, t in enumerate(toks) if t in eos_ids), None)
            n = len(toks) if stop is None else stop + 1
            text = tokenizer.decode(toks[:n], skip_special_tokens=True).strip()
            out.append(
                Generation(
                    response=text,
                    n_tokens=n,
                    finish_reason="length" if stop is None else "stop",
                    mean_logprob=float(logp[row, :n].mean()) if n else None,
                    self_certainty=float(cert[row, :n].mean()) if n else None,
                )
            )
        if progress:
            progress(len(batch))
    return out


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
