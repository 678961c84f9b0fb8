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
        ({}, "5bb1129c1f6b9747"),
        ({"model": {"engine": "vllm"}}, "3eec8cfba0dfff94"),
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
            "c55ca588096ef247",
        ),
        (judge_on(ENDPOINT), "689f7a21b8c9dc28"),
        (judge_on({"name": "j", "engine": "vllm"}), "1fc9474fe552c696"),
        (judge_on({"name": "j"}), "953966cc00fc92ae"),
    ],
)
def test_hash_is_pinned(overrides, expected):
    assert C.load_config(None, overrides).hash() == expected


def test_default_config_hash_is_pinned():
    assert C.FlywheelConfig().hash() == "5bb1129c1f6b9747"


def test_speed_only_settings_keep_the_pinned_hash():
    faster = dict(
        ENDPOINT,
        openai=dict(
            ENDPOINT["openai"], max_concurrency=64, timeout_s=5, retries=9, backoff_s=0.1, api_key_env="OTHER_KEY"
        ),
    )
    assert C.load_config(None, judge_on(faster)).hash() == "689f7a21b8c9dc28"
    eager = {"model": {"engine": "vllm", "vllm": {"gpu_memory_utilization": 0.3, "enforce_eager": True}}}
    assert C.load_config(None, eager).hash() == "3eec8cfba0dfff94"


def test_an_engine_setting_declared_hashed_unless_default():
    # max_num_batched_tokens is hashed only when set (its Field's mark, applied to the engine's block)
    def vllm(**settings) -> str:
        return C.load_config(None, {"model": {"engine": "vllm", "vllm": settings}}).hash()

    assert vllm(max_num_batched_tokens=None) == vllm() == "3eec8cfba0dfff94"
    assert vllm(max_num_batched_tokens=4096) != vllm()
    assert vllm(kv_cache_gib=1.0) == vllm()  # speed only (the registration's)
