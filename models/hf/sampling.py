"""The `hf` engine's sampling and greedy generation: prompts in, `Generation`s out, through the
continuous-batching decoder (decode.py), which records each token's log-probability and the step's
self-certainty as it goes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flywheel import seeds
from flywheel.models.generation import Generation, chat_texts
from flywheel.models.hf import decode


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """`n` generations per prompt, prompt-major (prompt 0's n, then prompt 1's, …), by continuous
    batching (models/hf/decode.py). A sample's seed derives from (seed, prompt text, sample index), so
    its tokens do not depend on the batch size, the other prompts or their order."""
    texts = chat_texts(tokenizer, prompts)
    token_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    row_seeds = [[seeds.row(seed, p, k) for k in range(n)] for p in prompts] if do_sample else None
    rows = decode.decode(
        model,
        token_ids,
        n=n,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        do_sample=do_sample,
        eos_ids=eos_ids,
        pad_id=tokenizer.pad_token_id,
        temperature=temperature,
        top_p=top_p,
        seeds=row_seeds,
        progress=progress,
    )
    out = []
    for r in rows:
        k = len(r.tokens)
        out.append(
            Generation(
                response=tokenizer.decode(r.tokens, skip_special_tokens=True).strip(),
                n_tokens=k,
                finish_reason="stop" if r.stopped else "length",
                mean_logprob=sum(r.logps) / k if k else None,
                self_certainty=sum(r.certainty) / k if k else None,
            )
        )
    return out


def tokens_per_second(gens: Sequence[Generation], seconds: float) -> float:
    return sum(g.n_tokens for g in gens) / max(seconds, 1e-9)
