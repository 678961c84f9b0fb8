"""One interface for every model call a stage makes, with one module per backend.

    hf      transformers in this process (models/hf/decode.py's continuous batching): CPU or one GPU
    vllm    vLLM's offline engine: tensor parallelism, prefix caching, the GPU released on close()
    openai  any OpenAI-compatible server over HTTP: bounded concurrency, retries with backoff

The interface is `base.Engine`; the backends are registered in `registry.py` (an installed
package adds one through the `flywheel.engines` entry-point group); a model config's `engine:`
names one. One engine is open at a time (`open_engine` closes the previous one), so stages take
turns on the GPUs, and `release()` frees it before training. Importing this package loads neither
torch nor any backend's library: the hf backend is imported when an hf engine opens.
"""

from __future__ import annotations

import json
import threading

from flywheel.models.engines.base import Engine, Settings, label_mass
from flywheel.models.engines.openai import (
    RETRY_STATUS,
    OpenAIEngine,
    OpenAISettings,
    _retry_after,
    _top_logprobs,
    draws_mass,
    openai_completion,
)
from flywheel.models.engines.registry import Backend, get, names, register
from flywheel.models.engines.vllm import VLLMEngine, VLLMSettings, vllm_sampling_params
from flywheel.models.generation import Generation, NextToken, Progress, rendered_prompts

__all__ = [
    "RETRY_STATUS",
    "Backend",
    "Engine",
    "Generation",
    "NextToken",
    "OpenAIEngine",
    "OpenAISettings",
    "Progress",
    "Settings",
    "VLLMEngine",
    "VLLMSettings",
    "_retry_after",
    "_top_logprobs",
    "draws_mass",
    "get",
    "label_mass",
    "model_ref",
    "names",
    "open_engine",
    "openai_completion",
    "preflight",
    "register",
    "release",
    "rendered_prompts",
    "vllm_sampling_params",
]


def __getattr__(name: str):
    if name == "HFEngine":  # the hf backend imports torch: only when asked for
        from flywheel.models.engines.hf import HFEngine

        return HFEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_OPEN: dict[str, Engine] = {}
_OPEN_LOCK = threading.Lock()


def _key(model_cfg, ref: str) -> str:
    return json.dumps([ref, model_cfg.model_dump(mode="json")], sort_keys=True)


def open_engine(model_cfg, ref: str) -> Engine:
    """The engine for `ref` under `model_cfg` (its engine, dtype and settings). One is kept open:
    asking for another closes it first, so two models never share the GPU. `ref` is what
    `model_ref` gives: a resolved checkpoint (hf, vllm) or the served model's name (openai)."""
    key = _key(model_cfg, ref)
    with _OPEN_LOCK:
        if key in _OPEN:
            return _OPEN[key]
        _release_locked()
        engine = get(model_cfg.engine).factory(model_cfg, ref)
        _OPEN[key] = engine
        return engine


def release() -> None:
    """Close the open engine (before training takes the GPUs)."""
    with _OPEN_LOCK:
        _release_locked()


def _release_locked() -> None:
    while _OPEN:
        _, engine = _OPEN.popitem()
        engine.close()


def model_ref(model_cfg) -> str:
    """What a judge's own model config names, as its engine opens it."""
    return get(model_cfg.engine).ref(model_cfg)


def preflight(config) -> None:
    """Before any work: every engine the config names can start (its package installed, its key set),
    and every judge's own model exists."""
    if config.benchmark.lm_eval is not None:
        from flywheel.models import harness  # lm-evaluation-harness's check loads it only when suites are set

        harness.check(config.benchmark.lm_eval)
    models = [config.model] + [s.model for s in config.judge.sources if getattr(s, "model", None) is not None]
    for m in models:
        get(m.engine).preflight(m, policy=m is config.model)
