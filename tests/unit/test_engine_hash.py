"""The config hash keys every stage's manifest: a change in how engines are declared must leave it
bit-identical, or every earlier run would redo its stages on resume. The figures were computed before
engines became a registry."""

from __future__ import annotations

import pytest

from flywheel import config as C

ENDPOINT = {
    "name": "big-judge",
    "engine": "openai",
    "openai": {"base_url": "http://127.0.0.1:9/v1", "tokenizer": "tok"},
}


def judge_on(model: dict) -> dict:
    return {"judge": {"sources": ["verifier", {"type": "llm_judge", "model": model}]}}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, "adb79cd814902004"),
        ({"model": {"engine": "vllm"}}, "60a300dd39831053"),
        (
            {
                "model": {
                    "engine": "vllm",
                    "vllm": {
                        "gpu_memory_utilization": 0.5,
                        "enforce_eager": True,
                        "max_model_len": 4096,
                        "tensor_parallel_size": 2,
                    },
                }
            },
            "d1df58279f8fdaf6",
        ),
        (judge_on(ENDPOINT), "69797b78dc69e478"),
        (judge_on({"name": "j", "engine": "vllm"}), "9856572fad2f8d89"),
        (judge_on({"name": "j"}), "2713a2fc22598dd7"),
    ],
)
def test_hash_is_pinned(overrides, expected):
    assert C.load_config(None, overrides).hash() == expected


def test_default_config_hash_is_pinned():
    assert C.FlywheelConfig().hash() == "adb79cd814902004"


def test_speed_only_settings_keep_the_pinned_hash():
    faster = dict(
        ENDPOINT,
        openai=dict(
            ENDPOINT["openai"], max_concurrency=64, timeout_s=5, retries=9, backoff_s=0.1, api_key_env="OTHER_KEY"
        ),
    )
    assert C.load_config(None, judge_on(faster)).hash() == "69797b78dc69e478"
    eager = {"model": {"engine": "vllm", "vllm": {"gpu_memory_utilization": 0.3, "enforce_eager": True}}}
    assert C.load_config(None, eager).hash() == "60a300dd39831053"


def test_an_engine_setting_declared_hashed_unless_default():
    # max_num_batched_tokens is hashed only when set (its Field's mark, applied to the engine's block)
    def vllm(**settings) -> str:
        return C.load_config(None, {"model": {"engine": "vllm", "vllm": settings}}).hash()

    assert vllm(max_num_batched_tokens=None) == vllm() == "60a300dd39831053"
    assert vllm(max_num_batched_tokens=4096) != vllm()
    assert vllm(kv_cache_gib=1.0) == vllm()  # speed only (the registration's)
