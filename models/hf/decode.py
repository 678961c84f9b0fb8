"""Continuous-batching decoding for the `hf` engine: sampling and greedy generation near the CPU's limit.

transformers' `generate()` runs every row of a batch until the longest one ends and prefills a prompt
once per sample. For the flywheel's workload (N samples of short answers to ~50-token prompts)
most of that is waste: on the default round 5 of every 6 forward tokens were prompt copies or
rows that had already stopped. This loop instead

- prefills each prompt once and copies its KV cache for its N samples,
- prefills the prompts' common token prefix (the chat template's system turn) once for all,
- drops a row from the batch the step it ends, and admits waiting prompts into the free slots
  (continuous batching), so every decode step runs on a full batch of live rows,
- keeps the KV cache in preallocated buffers written in place (no per-step concatenation).

Each row samples with its own generator, seeded from (seed, prompt text, sample index): a row's
tokens do not depend on which rows share its batch, on the batch size or on the order of prompts
(up to float rounding of the logits, which batch shape can change in the last bits).

Rows are padded on the left of each segment (shared prefix, prompt, generated tokens) and the
attention mask marks real tokens; position ids count a row's real tokens, so a row computes what
it would alone.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from flywheel import compat
from flywheel.errors import EngineError


@dataclass
class Row:
    prompt: int  # index into the prompts
    sample: int  # sample index within its prompt
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    certainty: list[float] = field(default_factory=list)
    stopped: bool = False  # ended with an end-of-sequence token
    finished: bool = False  # stopped, or reached max_new_tokens


class KV:
    """Per-layer key/value buffers [rows, heads, capacity, dim], filled up to `length` columns, and
    the attention mask over those columns. Rows are added (admission) and removed (finished rows)
    between steps; a step appends one column in place."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [rows, length] long
        self.length = 0

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def _grow(self, length: int) -> None:
        """Ensure capacity for `length` columns (doubling), keeping content."""
        cap = self.keys[0].shape[2] if self.keys else 0
        if length <= cap:
            return
        new_cap = max(length, 2 * cap, 64)
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                grown = t.new_zeros(t.shape[0], t.shape[1], new_cap, t.shape[3])
                grown[:, :, : self.length] = t[:, :, : self.length]
                store[i] = grown

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor) -> None:
        """Append rows (their own [n, h, L, d] caches and [n, L] mask), right-aligned with the
        existing rows: the shorter side is padded on the left, masked out."""
        if self.mask is None:
            self.keys = [k.contiguous() for k in keys]
            self.values = [v.contiguous() for v in values]
            self.mask, self.length = mask.clone(), mask.shape[1]
            return
        new_len = mask.shape[1]
        if new_len > self.length:  # shift the existing rows right to make room on the left
            shift = new_len - self.length
            self._grow(new_len)
            for store in (self.keys, self.values):
                for t in store:
                    t[:, :, shift:new_len] = t[:, :, : self.length].clone()
                    t[:, :, :shift] = 0
            self.mask = torch.cat([self.mask.new_zeros(self.rows, shift), self.mask], dim=1)
            self.length = new_len
        pad = self.length - new_len
        cap = self.keys[0].shape[2]
        for store, new in ((self.keys, keys), (self.values, values)):
            for i, (t, n) in enumerate(zip(store, new)):
                block = n.new_zeros(n.shape[0], n.shape[1], cap, n.shape[3])
                block[:, :, pad : self.length] = n
                store[i] = torch.cat([t, block], dim=0)
        self.mask = torch.cat([self.mask, torch.cat([mask.new_zeros(mask.shape[0], pad), mask], dim=1)], dim=0)

    def keep(self, index: torch.Tensor) -> None:
        assert self.mask is not None  # rows exist: admission made the mask
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                store[i] = t.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        # drop leading columns no row uses any more
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.length
        if start > 0:
            for store in (self.keys, self.values):
                for t in store:
                    t[:, :, : self.length - start] = t[:, :, start : self.length].clone()
            self.mask = self.mask[:, start:]
            self.length -= start


class BufferCache:
    """A transformers Cache over a KV's buffers for one forward step: each layer's `update` writes the
    step's new columns in place and returns views of the filled part."""

    def __init__(self, kv: KV, new_tokens: int) -> None:
        from transformers import DynamicCache

        self.kv, self.new = kv, new_tokens
        kv._grow(kv.length + new_tokens)
        self.cache = DynamicCache()
        self.cache.layers.extend(_buffer_layer(self, i) for i in range(len(kv.keys)))

    def commit(self) -> None:
        self.kv.length += self.new


def _buffer_layer(owner: BufferCache, index: int):
    def update(key_states, value_states):
        kv, n = owner.kv, owner.new
        start = kv.length
        kv.keys[index][:, :, start : start + n] = key_states
        kv.values[index][:, :, start : start + n] = value_states
        return kv.keys[index][:, :, : start + n], kv.values[index][:, :, : start + n]

    return compat.buffer_cache_layer(update, lambda: owner.kv.length)


@dataclass
class Step:
    """What sampling needs from one step's logits."""

    token: torch.Tensor  # [rows]
    logp: torch.Tensor  # [rows] log-prob of the token under the model's own (pre-temperature) distribution
    certainty: torch.Tensor  # [rows] KL(uniform || p)


def choose(logits: torch.Tensor, rows: Sequence[Row], *, do_sample: bool, temperature: float, top_p: float) -> Step:
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    certainty = -math.log(logp.shape[-1]) - logp.mean(dim=-1)
    if not do_sample:
        token = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        order = None
        if top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)
            cum = probs.cumsum(dim=-1)
            probs = probs.masked_fill(cum - probs >= top_p, 0.0)  # the smallest set reaching top_p
        cum = probs.cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(cum.device) * cum[:, -1]
        token = torch.searchsorted(cum, u[:, None]).squeeze(1).clamp(max=cum.shape[-1] - 1)
        if order is not None:
            token = order.gather(1, token[:, None]).squeeze(1)
    return Step(token, logp.gather(1, token[:, None]).squeeze(1), certainty)


# What a checkpoint's generation_config can ask of generate() that changes which tokens it picks and
# that this decoder does not do, each with the values that ask nothing. The sampling warpers
# (temperature, top_k, top_p, min_p, typical_p, …) are not here: every engine samples the flywheel
# config's distribution (its temperature and top_p, the others off) whatever a checkpoint suggests,
# and sampling.generate_reference asks generate() for the same.
UNSUPPORTED = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "remove_invalid_values": (None, False),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
    "num_beams": (None, 1),
    "dola_layers": (None,),
    "constraints": (None,),
    "force_words_ids": (None,),
    "token_healing": (None, False),
}


def check_generation_config(model) -> None:
    """Refuse a model whose generation_config asks for decoding this decoder does not do: its answers
    would differ from generate()'s without a word."""
    config = getattr(model, "generation_config", None)
    for name, neutral in UNSUPPORTED.items():
        value = getattr(config, name, None)
        if value not in neutral:
            raise EngineError(
                f"model {model.name_or_path}: its generation_config sets {name}={reprlib.repr(value)}, "
                "which flywheel's decoder does not apply (generate() would); remove it from the "
                "checkpoint's generation_config.json"
            )


def stop_ids(model, *extra: int | None) -> set[int]:
    """The tokens that end a row: every end-of-sequence id of the model's generation_config (Llama-3
    lists several: <|eot_id|>, <|eom_id|>, …) and `extra` (the tokenizer's EOS and pad)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return {int(i) for i in (*ids, *extra) if i is not None}


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence shares at its start, leaving each at least one of its own (0 for fewer
    than two sequences: nothing is shared)."""
    if len(seqs) < 2:
        return 0
    first, n = seqs[0], min(len(x) for x in seqs) - 1
    for seq in seqs[1:]:
        i = 0
        while i < n and seq[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


@torch.inference_mode()
def decode(
    model,
    token_ids: Sequence[Sequence[int]],
    *,
    n: int,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool,
    eos_ids: set[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seeds: Sequence[Sequence[int]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Row]:
    """`n` rows per prompt (token ids, chat-formatted); rows in prompt-major order when returned.
    `seeds[p][s]`: row (p, s)'s generator seed (sampling only). A row ends on any of `eos_ids` or of
    the model's own end-of-sequence ids."""
    check_generation_config(model)
    eos_ids = stop_ids(model, *eos_ids)
    device = model.device
    n_layers = model.config.num_hidden_layers
    batch_size = max(batch_size, n)
    # The prompts' shared start (the system turn) is computed once and copied into every admission.
    n_prefix = common_prefix_len(token_ids)
    prefix = _prefix_kv(model, token_ids[0][:n_prefix]) if n_prefix else None
    # Longest prompts first: they fill the cache's columns once, the shorter ones pad into them.
    waiting = sorted(range(len(token_ids)), key=lambda p: -len(token_ids[p]))
    kv = KV()
    live: list[Row] = []
    done: dict[tuple[int, int], Row] = {}
    pending: torch.Tensor | None = None  # [live] the next input token of each live row
    pos = torch.zeros(0, dtype=torch.long, device=device)  # next position of each live row

    def admit(prompts: list[int]) -> tuple[list[Row], Step, torch.Tensor]:
        """Prefill `prompts` (their suffixes after the shared prefix), copy each cache n times,
        and add the rows to the KV; the rows, their first step, and their next positions."""
        ids, mask = left_pad([token_ids[p][n_prefix:] for p in prompts], pad_id, device, lead=n_prefix)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, n_prefix:]
        cache = _cache_from(
            [
                (k.expand(len(prompts), -1, -1, -1).contiguous(), v.expand(len(prompts), -1, -1, -1).contiguous())
                for k, v in prefix or []
            ]
        )
        logits = _fill(model, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
        keys = [layer.keys.repeat_interleave(n, dim=0) for layer in cache.layers[:n_layers]]
        values = [layer.values.repeat_interleave(n, dim=0) for layer in cache.layers[:n_layers]]
        kv.add(keys, values, mask.repeat_interleave(n, dim=0))
        rows = []
        for p in prompts:
            for s in range(n):
                g = None
                if do_sample:
                    g = torch.Generator().manual_seed(seeds[p][s] if seeds else 0)
                rows.append(Row(p, s, g))
        step = choose(
            logits.repeat_interleave(n, dim=0), rows, do_sample=do_sample, temperature=temperature, top_p=top_p
        )
        first_pos = mask.sum(1).repeat_interleave(n)
        return rows, step, first_pos

    def record(rows: Sequence[Row], step: Step) -> None:
        tokens, logps, certs = step.token.tolist(), step.logp.tolist(), step.certainty.tolist()
        ended = 0
        for r, t, lp, c in zip(rows, tokens, logps, certs):
            if r.finished:  # waiting to be dropped: its step was computed, not recorded
                continue
            r.tokens.append(t)
            r.logps.append(lp)
            r.certainty.append(c)
            r.stopped = t in eos_ids
            if r.stopped or len(r.tokens) >= max_new_tokens:
                r.finished = True
                done[(r.prompt, r.sample)] = r
                ended += 1
        if progress and ended:
            progress(ended)

    while waiting or live:
        dead = sum(r.finished for r in live)
        free = batch_size - (len(live) - dead)
        # Admit when a quarter of the batch is free (or nothing runs): prefills come in useful sizes.
        admit_now = bool(waiting) and (dead == len(live) or free >= max(n, batch_size // 4))
        # Finished rows leave the batch in groups: dropping one copies every layer's cache.
        if dead and (admit_now or dead == len(live) or dead >= max(1, batch_size // 8)):
            keep = [i for i, r in enumerate(live) if not r.finished]
            index = torch.tensor(keep, dtype=torch.long, device=device)
            live = [live[i] for i in keep]
            assert pending is not None  # live rows, each with its next token
            pending, pos = pending.index_select(0, index), pos.index_select(0, index)
            if live:
                kv.keep(index)
            else:
                kv = KV()
        if admit_now:
            take = waiting[: max(1, free // n)]
            waiting = waiting[len(take) :]
            rows, step, first_pos = admit(take)
            record(rows, step)
            live += rows
            pending = step.token if pending is None or not len(pending) else torch.cat([pending, step.token])
            pos = torch.cat([pos, first_pos])
        elif live:
            assert pending is not None and kv.mask is not None  # live rows were admitted
            bc = BufferCache(kv, 1)
            mask = torch.cat([kv.mask, kv.mask.new_ones(kv.rows, 1)], dim=1)
            logits = model(
                input_ids=pending[:, None],
                attention_mask=mask,
                position_ids=pos[:, None],
                cache=bc.cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            bc.commit()
            kv.mask = mask
            pos = pos + 1
            step = choose(logits, live, do_sample=do_sample, temperature=temperature, top_p=top_p)
            record(live, step)
            pending = step.token
    return [done[(p, s)] for p in range(len(token_ids)) for s in range(n)]


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device=None, lead: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left to one width, and their attention mask; `lead` columns of ones
    in front of the mask stand for a prefix already in the cache."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), lead + width), dtype=torch.long, device=device)
    mask[:, :lead] = 1
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long, device=device)
            mask[i, lead + width - len(r) :] = 1
    return ids, mask


def _prefix_kv(model, ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values for one token sequence (a prefix many rows share)."""
    cache = _cache_from([])
    _fill(model, cache, input_ids=torch.tensor([list(ids)], device=model.device))
    return [(layer.keys, layer.values) for layer in cache.layers[: model.config.num_hidden_layers]]


def _fill(model, cache, **inputs) -> torch.Tensor:
    """One forward pass that appends its keys and values to `cache`, an object the caller holds and
    reads back (the output's field for it is named differently across transformers releases); the
    last position's logits. A transformers that ignored `cache=` would leave it short and every row
    would decode without its context: that fails here, loudly."""
    expected = cache.get_seq_length() + inputs["input_ids"].shape[1]
    logits = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    if cache.get_seq_length() != expected:
        import transformers

        raise EngineError(
            f"transformers {transformers.__version__} ignored the KV cache passed as `cache=`: "
            "install a transformers release flywheel supports (pyproject.toml)"
        )
    return logits


def _cache_from(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for li, (k, v) in enumerate(kv):
        cache.update(k, v, li)
    return cache


@torch.inference_mode()
def last_logits(
    model,
    token_ids: Sequence[Sequence[int]],
    groups: Sequence[object],
    *,
    batch_size: int,
    pad_id: int,
    progress: Callable[[int], None] | None = None,
):
    """The next-token logits after each sequence (one forward each, no generation), computing every
    shared prefix once: the prefix all sequences share (a judge's rubric) once for all, then per
    group (sequences with the same `groups` key: the same question) the tokens its members share,
    then each sequence's own tail. Yields (indices, logits [len(indices), vocab]) per batch of at
    most `batch_size` sequences (a group is never split unless it alone exceeds the batch)."""
    device = model.device
    n_layers = model.config.num_hidden_layers
    p0 = common_prefix_len(token_ids)
    prefix = _prefix_kv(model, token_ids[0][:p0]) if p0 else None
    members: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    chunks: list[list[list[int]]] = [[]]
    for idx in members.values():
        for start in range(0, len(idx), batch_size):  # a group larger than a batch is split
            part = idx[start : start + batch_size]
            if sum(map(len, chunks[-1])) + len(part) > batch_size:
                chunks.append([])
            chunks[-1].append(part)
    for chunk in chunks:
        if not chunk:
            continue
        # per group: the tokens its members share after the global prefix (none for a lone member)
        ends = [p0 + common_prefix_len([token_ids[i][p0:] for i in part]) if len(part) > 1 else p0 for part in chunk]
        ids, g_mask = left_pad([token_ids[part[0]][p0:end] for part, end in zip(chunk, ends)], pad_id, device, lead=p0)
        width = ids.shape[1]
        cache_rows = None
        if width:
            cache = _cache_from(
                [
                    (k.expand(len(chunk), -1, -1, -1).contiguous(), v.expand(len(chunk), -1, -1, -1).contiguous())
                    for k, v in prefix or []
                ]
            )
            positions = (g_mask.cumsum(1) - 1).clamp(min=0)[:, p0:]
            _fill(model, cache, input_ids=ids, attention_mask=g_mask, position_ids=positions)
            cache_rows = [(layer.keys, layer.values) for layer in cache.layers[:n_layers]]
        elif prefix is not None:
            cache_rows = [(k.expand(len(chunk), -1, -1, -1), v.expand(len(chunk), -1, -1, -1)) for k, v in prefix]
        rows = [i for part in chunk for i in part]
        owner = torch.tensor([r for r, part in enumerate(chunk) for _ in part], dtype=torch.long, device=device)
        tails = [list(token_ids[i][end:]) for part, end in zip(chunk, ends) for i in part]
        ids, t_mask = left_pad(tails, pad_id, device)
        t_width = ids.shape[1]
        mask = torch.cat([g_mask.index_select(0, owner), t_mask], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, mask.shape[1] - t_width :]
        cache = None
        if cache_rows is not None:
            cache = _cache_from([(k.index_select(0, owner), v.index_select(0, owner)) for k, v in cache_rows])
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
            logits_to_keep=1,
        ).logits[:, -1]
        if progress:
            progress(len(rows))
        yield rows, logits
