"""The engine interface without a GPU: request translation, verdict reading, config validation,
the hash, and the vllm extra's resolution."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel import config as C
from flywheel.errors import ConfigError, EngineError
from flywheel.models import engines
from flywheel.models.engines import registry

ROOT = Path(__file__).resolve().parents[2]


def test_vllm_requests():
    s = engines.vllm_sampling_params("sample", max_new_tokens=32, temperature=0.7, top_p=0.9, seed=11)
    # plain sampling at the given temperature: no top-k, the sampled token's own log-prob, a per-request seed
    assert s == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,
        "max_tokens": 32,
        "seed": 11,
        "logprobs": 0,
        "skip_special_tokens": True,
    }
    assert engines.vllm_sampling_params("greedy", max_new_tokens=8)["temperature"] == 0.0
    nt = engines.vllm_sampling_params("next_token", top_logprobs=20)
    assert (nt["max_tokens"], nt["logprobs"], nt["temperature"]) == (1, 20, 0.0)
    assert engines.vllm_sampling_params("prompt_logprobs")["prompt_logprobs"] == 0
    with pytest.raises(ValueError, match="unknown request kind"):
        engines.vllm_sampling_params("beam")


def test_openai_requests_ask_for_the_plain_distribution():
    body = engines.openai_completion("sample", "m", "text", max_new_tokens=16, temperature=1.0, top_p=1.0, seed=3)
    # servers' own defaults (llama.cpp: top_k 40, min_p 0.05, repeat penalty 1.1) would sample another distribution
    assert body["top_k"] == 0 and body["min_p"] == 0.0 and body["repeat_penalty"] == 1.0
    assert (body["seed"], body["max_tokens"], body["logprobs"], body["prompt"]) == (3, 16, 1, "text")
    judge = engines.openai_completion("next_token", "m", "text", top_logprobs=5)
    assert (judge["max_tokens"], judge["temperature"], judge["logprobs"]) == (1, 0.0, 5)
    assert engines.openai_completion("verdict_draw", "m", "t", seed=9)["temperature"] == 1.0


def test_label_mass_sums_spellings_and_ignores_others():
    nt = engines.label_mass(
        {" 3": math.log(0.3), "3": math.log(0.1), "4": math.log(0.2), "Score": math.log(0.35), "5": float("-inf")},
        ("3", "4", "5"),
    )
    assert nt.mass == pytest.approx({"3": 0.4, "4": 0.2, "5": 0.0})
    assert nt.top == "Score"  # the most likely token is not a label: the verdict does not parse
    drawn = engines.draws_mass([" 4", "4", "x", " 2"], ("2", "4"))
    assert drawn.mass == {"2": 0.25, "4": 0.5} and drawn.top == "4"


def test_top_logprobs_in_both_answer_shapes():
    legacy = {"choices": [{"logprobs": {"top_logprobs": [{"3": -0.1}]}}]}
    chat = {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "4", "logprob": -0.2}]}]}}]}
    assert engines._top_logprobs(legacy) == {"3": -0.1}
    assert engines._top_logprobs(chat) == {"4": -0.2}
    assert engines._top_logprobs({"choices": [{"logprobs": None}]}) is None


def judge_on(model: dict) -> dict:
    return {"judge": {"sources": ["verifier", {"type": "llm_judge", "model": model}]}}


ENDPOINT = {"name": "big-judge", "engine": "openai", "openai": {"base_url": "http://127.0.0.1:9/v1"}}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": {"engine": "openai", "openai": {"base_url": "http://h/v1"}}}, "cannot serve the policy"),
        ({"model": {"engine": "gguf"}}, "model.engine"),
        (judge_on({"name": "j", "engine": "openai"}), "engine: openai needs `openai: {base_url"),
        (judge_on({"name": "j", "engine": "openai", "openai": {"base_url": "127.0.0.1:8000"}}), "base_url"),
        (judge_on(dict(ENDPOINT, openai={"base_url": "http://h/v1", "max_concurrency": 0})), "max_concurrency"),
        (
            {"model": {"engine": "vllm"}, "judge": {"sources": ["verifier", "self_certainty"]}},
            "self_certainty) needs the full next-token distribution",
        ),
        (
            {"judge": {"sources": ["verifier", {"type": "llm_judge", "previous": True, "model": "other"}]}},
            "cannot go with a fixed judge `model`",
        ),
        ({"model": {"vllm": {"gpu_memory_utilization": 1.5}}}, "gpu_memory_utilization"),
    ],
)
def test_impossible_engine_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{")):
        C.load_config(None, overrides)


def test_hash_counts_meaning_not_speed_or_secrets():
    base = C.load_config(None, judge_on(ENDPOINT))
    faster = C.load_config(
        None,
        judge_on(
            dict(
                ENDPOINT,
                openai=dict(ENDPOINT["openai"], max_concurrency=64, timeout_s=5, retries=9, api_key_env="OTHER_KEY"),
            )
        ),
    )
    other_model = C.load_config(None, judge_on(dict(ENDPOINT, name="bigger-judge")))
    assert base.hash() == faster.hash() != other_model.hash()
    assert C.load_config(None, {"model": {"engine": "vllm"}}).hash() != C.FlywheelConfig().hash()
    # the default config hashes as it did before engines existed, so earlier runs still resume
    payload = C.FlywheelConfig().model_dump(
        mode="json",
        exclude={
            "workspace": True,
            "rounds": True,
            "judge": {"batch_size"},
            "stages": True,
            "promotion": {"stop_after"},
            "registry": True,
        },
    )
    for key in ("engine", "vllm", "openai", "workers"):
        payload["model"].pop(key)
    payload["sampling"].pop("shards")
    payload["sampling"].pop("frontier")
    payload["sampling"].pop("hint")
    payload["task"].pop("curriculum")
    payload["benchmark"].pop("transfer")
    for s in payload["judge"]["sources"]:
        s.pop("model", None)
    payload["promotion"].pop("rule")
    payload["promotion"].pop("length_slack_tokens")
    payload["benchmark"].pop("lm_eval")
    payload["curation"].pop("sft_per_prompt")
    assert C.FlywheelConfig().hash() == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def test_api_key_is_named_never_held(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret-value")
    cfg = C.load_config(None, judge_on(dict(ENDPOINT, openai=dict(ENDPOINT["openai"], api_key_env="JUDGE_KEY"))))
    flat = json.dumps(cfg.flat())
    assert "JUDGE_KEY" in flat and "sk-secret-value" not in flat
    engine = engines.OpenAIEngine(cfg.judge.sources[1].model)
    assert engine.client.headers["authorization"] == "Bearer sk-secret-value"
    assert "sk-secret" not in engine.describe() and "sk-secret" not in repr(vars(engine.cfg))


def test_preflight_names_what_is_missing(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(EngineError, match=r"engine vllm needs vLLM: pip install 'flywheel\[vllm\]'"):
            engines.preflight(C.load_config(None, {"model": {"engine": "vllm"}}))
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    keyed = judge_on(dict(ENDPOINT, openai={"base_url": "http://h:1/v1", "api_key_env": "JUDGE_KEY"}))
    with pytest.raises(EngineError, match=r"endpoint http://h:1/v1: environment variable JUDGE_KEY"):
        engines.preflight(C.load_config(None, keyed))
    with pytest.raises(Exception, match="big-judge"):  # no tokenizer to render its prompts with
        engines.preflight(C.load_config(None, judge_on(ENDPOINT)))


def test_one_engine_open_at_a_time(monkeypatch):
    opened, closed = [], []

    class Fake(engines.Engine):
        def __init__(self, ref, dtype="auto"):
            super().__init__(ref)
            opened.append(ref)

        def close(self):
            closed.append(self.ref)

    monkeypatch.setitem(
        registry._BACKENDS, "hf", dataclasses.replace(registry.get("hf"), factory=lambda cfg, ref: Fake(ref))
    )
    engines.release()
    cfg = C.ModelConfig()
    a = engines.open_engine(cfg, "a")
    assert engines.open_engine(cfg, "a") is a and opened == ["a"]
    engines.open_engine(cfg, "b")
    assert closed == ["a"]
    engines.release()
    assert closed == ["a", "b"]


@pytest.mark.slow
def test_vllm_extra_resolves_with_flywheels_pins(tmp_path):
    """pip's resolver, for real, against the package registry: the vllm extra and flywheel's own
    dependencies install together, with the tested torch and transformers."""
    report = tmp_path / "report.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--disable-pip-version-check",
            "--report",
            str(report),
            "torch==2.13.0",
            f"{ROOT}[vllm]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    versions = {
        i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    assert versions["vllm"].startswith("0.30.")
    assert versions["torch"].split("+")[0] == "2.13.0"
    assert versions["transformers"].startswith("5.") and versions["trl"].startswith("1.")
