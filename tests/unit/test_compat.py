"""flywheel/compat.py's private-API uses against the installed libraries: each still exists and looks
as flywheel expects (a changed release fails here, by name, before a run misbehaves), the tested
ranges agree with pyproject.toml and constraints.txt, and outside them flywheel leaves the private
API alone with one warning line."""

from __future__ import annotations

import inspect
import logging
import re
import tomllib
from pathlib import Path

import pytest

from flywheel import compat

ROOT = Path(__file__).resolve().parents[2]


def pyproject_range(dist: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    spec = next(s for s in specs if re.match(rf"{dist}\s*[><=]", s))
    lo, hi = re.search(r">=([\d.]+)", spec).group(1), re.search(r"<([\d.]+)", spec).group(1)
    return compat.release(lo), compat.release(hi)


@pytest.mark.parametrize("dist", sorted(compat.TESTED))
def test_tested_ranges_are_pyprojects(dist):
    assert compat.TESTED[dist] == pyproject_range(dist)


@pytest.mark.parametrize("dist", ["trl", "transformers", "prefect"])
def test_the_frozen_and_installed_releases_are_tested(dist):
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    lo, hi = compat.TESTED[dist]
    assert lo <= compat.release(pins[dist]) < hi
    assert compat.tested(dist), f"installed {dist} {compat.installed(dist)} is outside {compat.TESTED[dist]}"


def test_release_reads_versions():
    assert compat.release("5.25.0.dev0") == (5, 25, 0) and compat.release("2.13.0+cu128") == (2, 13, 0)
    assert compat.release("0.30") == (0, 30) and compat.release("x") == ()


@pytest.fixture
def untested(monkeypatch, caplog):
    """Every library reported at a release outside the tested ranges."""
    compat.tested.cache_clear()
    monkeypatch.setattr(compat, "installed", lambda dist: "99.0.0")
    caplog.set_level(logging.WARNING, logger="flywheel.compat")
    yield caplog
    compat.tested.cache_clear()


def test_outside_the_range_one_warning_line(untested):
    assert not compat.tested("trl") and not compat.tested("trl")
    [record] = untested.records
    assert "\n" not in record.getMessage()
    assert record.getMessage() == (
        "trl 99.0.0 is outside the releases flywheel was tested with (>=1.16,<1.17): its "
        "private API is not used (see flywheel/compat.py)"
    )


# --------------------------------------------------------------------------------------------- TRL


@pytest.fixture
def trl_utils(monkeypatch):
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)  # restored after the test
    return trl_utils


def test_trl_use_triton_is_as_expected(trl_utils):
    original = getattr(trl_utils._use_triton, "__wrapped__", trl_utils._use_triton)
    assert list(inspect.signature(original).parameters) == ["device"]
    assert compat.TRL_FUSED_HEAD_MARKER in inspect.getsource(trl_utils.add_fused_lm_head)


def test_trl_fused_head_on_cpu(trl_utils):
    import torch

    assert compat.trl_fused_head_on_cpu() and compat.trl_fused_head_on_cpu()  # idempotent
    patched = trl_utils._use_triton
    assert patched.flywheel_cpu and patched(torch.device("cpu"))
    assert getattr(patched.__wrapped__, "flywheel_cpu", False) is False  # wrapped once, not twice


def test_trl_own_choice_for_a_measurement(trl_utils):
    assert compat.trl_fused_head_on_cpu()
    patched = trl_utils._use_triton
    with compat.trl_own_lm_head_choice():
        assert trl_utils._use_triton is patched.__wrapped__  # TRL's own function
        assert compat.trl_fused_head_on_cpu() is False  # training inside the block does not patch again
        assert trl_utils._use_triton is patched.__wrapped__
    assert trl_utils._use_triton is patched


def test_trl_untested_is_left_alone(trl_utils, untested):
    original = trl_utils._use_triton
    if getattr(original, "flywheel_cpu", False):
        trl_utils._use_triton = original = original.__wrapped__
    assert compat.trl_fused_head_on_cpu() is False
    assert trl_utils._use_triton is original


# ------------------------------------------------------------------------------------ transformers


def test_transformers_dynamic_layer_is_as_expected():
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    assert list(inspect.signature(DynamicLayer.update).parameters)[:3] == ["self", "key_states", "value_states"]
    assert list(inspect.signature(DynamicLayer.get_seq_length).parameters) == ["self"]
    assert list(inspect.signature(DynamicLayer.get_mask_sizes).parameters) == ["self", "query_length"]
    # storage is allocated lazily, by layers not yet initialized: a buffer layer is marked initialized
    assert "if not self.is_initialized" in inspect.getsource(DynamicLayer.update)
    assert isinstance(DynamicCache().layers, list)


def test_buffer_cache_layer_serves_the_callers_storage():
    import torch
    from transformers import DynamicCache

    keys = torch.zeros(1, 1, 8, 2)
    filled = [3]

    def update(k, v):
        keys[:, :, filled[0] : filled[0] + k.shape[2]] = k
        return keys[:, :, : filled[0] + k.shape[2]], keys[:, :, : filled[0] + k.shape[2]]

    layer = compat.buffer_cache_layer(update, lambda: filled[0])
    cache = DynamicCache()
    cache.layers.append(layer)
    assert cache.get_seq_length() == 3 and layer.get_mask_sizes(2) == (5, 0)
    k, _ = cache.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 0)
    assert k.shape[2] == 4 and keys[0, 0, 3].tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------------------- Prefect


def _prefect_api():
    import prefect.context

    return getattr(prefect.context, "_temporary_global_settings_context", None)


def test_prefect_global_settings_context_is_as_expected():
    api = _prefect_api()
    if api is None:
        # Prefect 3.7 (the vLLM environment's) has no such context: compat takes the public path only
        assert compat.release(compat.installed("prefect")) < (3, 9), "Prefect 3.9+ lost the global settings context"
        return
    assert list(inspect.signature(api).parameters) == ["settings_context"]
    assert "GLOBAL_SETTINGS_CONTEXT = settings_context" in inspect.getsource(api)


def test_prefect_global_settings_swaps_the_global_context():
    import prefect.context

    before = prefect.context.GLOBAL_SETTINGS_CONTEXT
    marker = before.model_copy()
    with compat.prefect_global_settings(marker):
        # where the private API is missing, the global context is left as it is
        assert prefect.context.GLOBAL_SETTINGS_CONTEXT is (marker if _prefect_api() else before)
    assert prefect.context.GLOBAL_SETTINGS_CONTEXT is before


def test_prefect_untested_is_left_alone(untested):
    import prefect.context

    before = prefect.context.GLOBAL_SETTINGS_CONTEXT
    with compat.prefect_global_settings(before.model_copy()):
        assert prefect.context.GLOBAL_SETTINGS_CONTEXT is before


# -------------------------------------------------------------------------------------------- vLLM


class _Core:
    def __init__(self) -> None:
        self.down = False

    def shutdown(self) -> None:
        self.down = True


def _llm():
    return type("LLM", (), {"llm_engine": type("Engine", (), {"engine_core": _Core()})()})()


def test_vllm_engine_core_is_as_expected():
    vllm = pytest.importorskip("vllm")
    assert compat.tested("vllm")
    assert not hasattr(vllm.LLM, "shutdown"), "vLLM has LLM.shutdown() now: compat can use it"
    from vllm.v1.engine.core_client import EngineCoreClient
    from vllm.v1.engine.llm_engine import LLMEngine

    assert "self.engine_core = EngineCoreClient.make_client(" in inspect.getsource(LLMEngine.__init__)
    assert callable(EngineCoreClient.shutdown)


def test_vllm_engine_core_shut_down_on_a_tested_vllm(monkeypatch):
    compat.tested.cache_clear()
    monkeypatch.setattr(compat, "installed", lambda dist: "0.30.2")
    llm = _llm()
    assert compat.shutdown_vllm_engine_core(llm) and llm.llm_engine.engine_core.down
    assert compat.shutdown_vllm_engine_core(object()) is False  # no core: left to garbage collection
    compat.tested.cache_clear()


def test_vllm_untested_is_left_alone(untested):
    llm = _llm()
    assert compat.shutdown_vllm_engine_core(llm) is False and not llm.llm_engine.engine_core.down
