"""The `openai` engine against a real OpenAI-compatible server on loopback: llama.cpp's server
(llama-cpp-python[server], a test dependency) serving the embedded model's own GGUF file. The
in-process `hf` engine runs the same weights, dequantized to fp32, so the two judges must agree
within a small tolerance; faults come from a server that fails on purpose."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stubs import OneToken, serving

from flywheel import config as C
from flywheel.errors import EngineError
from flywheel.models import engines, loading
from flywheel.models.engines.hf import HFEngine
from flywheel.models.rewards.rubric import SCORE_LABELS, load_rubric, verdicts

KEY_ENV, KEY = "FLYWHEEL_TEST_JUDGE_KEY", "sk-test-5f1c0ffee-do-not-log"
# Expected rubric scores (0–5) from the served Q4_1 GGUF and the in-process fp32 dequantization of
# it differ by llama.cpp's 8-bit activation rounding and the server's top-20 cut: measured over
# these 32 candidates, max 0.133 and mean 0.045 (of 20 parsed); a score is renormalised over the
# digits' mass (~0.4 here), which magnifies small probability differences.
SCORE_TOLERANCE, MEAN_TOLERANCE = 0.2, 0.08
# Each digit's probability: measured max difference 0.06.
MASS_TOLERANCE = 0.08


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """llama.cpp's OpenAI-compatible server on the embedded GGUF, requiring an API key."""
    port = free_port()
    gguf = loading.embedded_gguf("smollm2-135m-instruct")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            "smollm",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            "1",
            "--n_threads_batch",
            "1",
            "--n_ctx",
            "2048",
            "--api_key",
            KEY,
            "--interrupt_requests",
            "False",
            "--verbose",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    import httpx

    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited: {proc.stderr.read()[-2000:]}")
        try:
            if (
                httpx.get(
                    f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2
                ).status_code
                == 200
            ):
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("llama.cpp server did not answer in 120 s")
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=30)


def served(base_url: str, **openai) -> C.ModelConfig:
    return C.ModelConfig(
        name="smollm",
        engine="openai",
        openai={"base_url": base_url, "tokenizer": C.EMBEDDED_MODEL, "api_key_env": KEY_ENV, **openai},
    )


QUESTIONS = ["What is 3 + 4?", "What is 9 - 2?", "What is 5 + 5?", "What is 8 - 6?"]
RESPONSES = ["7", "The answer is 6.", "10", "It is 3 or 30", "2", "7 + 3 = 10", "4 - 4 = 0", "5"]


def test_served_judge_equals_in_process_judge(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    renders = [{"question": q, "response": r} for q in QUESTIONS for r in RESPONSES]
    rubric = load_rubric()
    remote = engines.OpenAIEngine(served(server, max_concurrency=2))
    local = HFEngine(loading.resolve(C.EMBEDDED_MODEL))
    a = remote.next_token(rubric, renders, SCORE_LABELS, max_prompt_tokens=1024)
    b = local.next_token(rubric, renders, SCORE_LABELS, batch_size=8, max_prompt_tokens=1024)
    assert remote.verdict_method == "top_logprobs_20" and local.verdict_method == "distribution"
    va, vb = verdicts(a, 0, 0), verdicts(b, 0, 0)
    assert [x.parse_ok for x in va] == [x.parse_ok for x in vb]
    diffs = [abs(x.score - y.score) for x, y in zip(va, vb) if x.score is not None]
    assert len(diffs) == sum(x.parse_ok for x in va)
    print(
        f"served vs in-process rubric scores on {len(renders)} candidates ({len(diffs)} parsed): "
        f"max difference {max(diffs):.3f}, mean {sum(diffs) / len(diffs):.3f}"
    )
    assert max(diffs) <= SCORE_TOLERANCE and sum(diffs) / len(diffs) <= MEAN_TOLERANCE
    for x, y in zip(a, b):
        assert max(abs(x.mass[k] - y.mass[k]) for k in SCORE_LABELS) <= MASS_TOLERANCE
    # the answers are the judge's own: different responses get different scores
    assert len({round(x.score, 3) for x in va if x.score is not None}) > 3


def test_served_sampling_is_seeded_per_sample(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    remote = engines.OpenAIEngine(served(server, max_concurrency=3))
    kw = {"n": 3, "max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 5}
    first = remote.sample(QUESTIONS[:2], **kw)
    assert len(first) == 6 and all(g.n_tokens > 0 and g.mean_logprob is not None for g in first)
    assert [g.response for g in remote.sample(QUESTIONS[:2], **kw)] == [g.response for g in first]
    assert [g.response for g in remote.sample(QUESTIONS[1:2], **kw)] == [g.response for g in first[3:]]
    assert len({g.response for g in first[:3]}) > 1  # three samples, not one repeated
    greedy = remote.greedy(QUESTIONS[:2], max_new_tokens=12)
    assert greedy == remote.greedy(QUESTIONS[:2], max_new_tokens=12)


def test_missing_or_wrong_key(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(EngineError, match=f"{KEY_ENV} .*is not set"):
        engines.OpenAIEngine(served(server))
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(EngineError, match="HTTP 401") as e:
        engines.OpenAIEngine(served(server, retries=0)).greedy(["hi"], max_new_tokens=2)
    assert "wrong" not in str(e.value)


class Faulty(OneToken):
    """Answers every POST by `mode`: 500, a 429 with Retry-After then 200, or no answer at all."""

    mode, hits = "500", []

    def before(self) -> bool:
        Faulty.hits.append(time.monotonic())
        if Faulty.mode == "hang":
            time.sleep(3)
            return True
        if Faulty.mode == "429" and len(Faulty.hits) < 3:
            self.send_response(429)
            self.send_header("Retry-After", "0.2")
            self.end_headers()
            return True
        if Faulty.mode == "500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal error")
            return True
        return False


@pytest.fixture
def faulty():
    Faulty.hits = []
    with serving(Faulty) as port:
        yield port


def endpoint(port: int, **openai) -> engines.OpenAIEngine:
    cfg = C.ModelConfig(
        name="judge",
        engine="openai",
        openai={"base_url": f"http://127.0.0.1:{port}/v1", "tokenizer": C.EMBEDDED_MODEL, "backoff_s": 0.05, **openai},
    )
    return engines.OpenAIEngine(cfg)


@pytest.mark.parametrize(
    "mode, retries, message",
    [
        ("500", 2, "failed after 3 tries: HTTP 500 internal error"),
        ("hang", 1, r"failed after 2 tries: no answer within 0.5 s \(openai.timeout_s\)"),
    ],
)
def test_failing_server_is_retried_then_named(faulty, mode, retries, message):
    Faulty.mode = mode
    e = endpoint(faulty, retries=retries, timeout_s=0.5)
    with pytest.raises(EngineError, match=message) as err:
        e.greedy(["What is 2 + 2?"], max_new_tokens=2)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"endpoint http://127.0.0.1:{faulty}/v1 failed")
    assert len(Faulty.hits) == retries + 1
    gaps = [b - a for a, b in zip(Faulty.hits, Faulty.hits[1:])]
    assert all(g >= 0.04 for g in gaps)  # backoff between tries


def test_unreachable_endpoint_is_retried_then_named():
    port = free_port()  # nothing listens there
    with pytest.raises(
        EngineError,
        match=rf"endpoint http://127.0.0.1:{port}/v1 failed after 3 tries: "
        "ConnectError",
    ):
        endpoint(port, retries=2).greedy(["What is 2 + 2?"], max_new_tokens=2)


def test_rate_limit_honours_retry_after_then_succeeds(faulty):
    Faulty.mode = "429"
    out = endpoint(faulty, retries=3).greedy(["What is 2 + 2?"], max_new_tokens=2)
    assert out[0].response == "4" and len(Faulty.hits) == 3
    assert Faulty.hits[1] - Faulty.hits[0] >= 0.19  # waited as Retry-After asked, not the 0.05 s backoff


def test_server_without_logprobs_judges_by_sampled_verdicts(faulty):
    """A server that returns no log-probs: each verdict is the share of k sampled verdict tokens."""
    Faulty.mode = "ok"
    e = endpoint(faulty, verdict_samples=4)
    nts = e.next_token(load_rubric(), [{"question": "2+2?", "response": "4"}], SCORE_LABELS, max_prompt_tokens=1024)
    assert e.verdict_method == "sampled_4"
    assert nts[0].mass["4"] == 1.0 and nts[0].top == "4"
    assert len(Faulty.hits) == 1 + 4  # the probe, then 4 draws


@pytest.mark.slow
def test_round_with_a_served_judge(server, tmp_path, monkeypatch, prefect_harness):
    """One round where a served judge scores every candidate over HTTP beside the policy's own
    in-process judge: the same candidates, the same scores within SCORE_TOLERANCE; judge health
    names each judge and how it read its verdicts; the API key is nowhere in the workspace."""
    import duckdb

    from flywheel.flows.flywheel import flywheel

    monkeypatch.setenv(KEY_ENV, KEY)
    ws = tmp_path / "ws"
    config = C.load_config(
        None,
        {
            "name": "served",
            "rounds": 1,
            "workspace": str(ws),
            "task": {"prompts_per_round": 6},
            "sampling": {"n": 4, "max_new_tokens": 24},
            "benchmark": {"size": 8, "validation_size": 8, "guards": [], "max_new_tokens": 24},
            "judge": {
                "sources": [
                    "verifier",
                    {"type": "llm_judge", "name": "self_judge"},
                    {
                        "type": "llm_judge",
                        "name": "served_judge",
                        "model": served(server, max_concurrency=2).model_dump(mode="json"),
                    },
                ],
                "subset": "all",
            },  # both judges on every candidate, to compare them
            "train": {"dpo": {"num_train_epochs": 1}},
        },
    )
    flywheel(config)
    con = duckdb.connect(str(ws / "catalog.duckdb"), read_only=True)
    both = con.sql("""SELECT a.score, b.score FROM judgments a JOIN judgments b USING (candidate_id)
                      WHERE a.source = 'self_judge' AND b.source = 'served_judge' AND a.round = 1""").fetchall()
    assert len(both) == con.execute("SELECT count(*) FROM candidates WHERE round = 1").fetchall()[0][0] == 24
    # Whether a verdict parsed (its top token is a digit) can flip where two tokens are nearly tied:
    # measured 23 of 24 alike.
    flips = sum((x is None) != (y is None) for x, y in both)
    diffs = [abs(x - y) for x, y in both if x is not None and y is not None]
    print(
        f"round: {len(both) - flips} of {len(both)} verdicts alike in parsing; scores max difference "
        f"{max(diffs):.3f}, mean {sum(diffs) / len(diffs):.3f}"
    )
    assert flips <= len(both) // 10
    assert max(diffs) <= SCORE_TOLERANCE and sum(diffs) / len(diffs) <= MEAN_TOLERANCE
    health = dict(
        con.sql("""SELECT source, model || ' / ' || method FROM judge_health
                             WHERE metric = 'judged' AND round = 1""").fetchall()
    )
    assert health["served_judge"] == f"openai:{server}#smollm / top_logprobs_20"
    assert health["self_judge"].startswith("hf:") and health["self_judge"].endswith(" / distribution")
    assert health["verifier"] is None
    con.close()
    leaked = [p for p in ws.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked


@pytest.mark.slow
def test_unreachable_judge_fails_the_round_in_one_line(tmp_path):
    """Through the CLI: retried, then one line naming the endpoint (its API key nowhere), exit 2,
    the round recorded as failed, no judgments written; the candidates stay for a resume."""
    import duckdb

    ws, port = tmp_path / "ws", free_port()
    cfg = tmp_path / "judge.yaml"
    cfg.write_text(
        json.dumps(
            {
                "rounds": 1,
                "task": {"prompts_per_round": 2},
                "sampling": {"n": 2, "max_new_tokens": 8},
                "benchmark": {"size": 2, "validation_size": 8, "guards": [], "max_new_tokens": 8},
                "judge": {
                    "sources": [
                        "verifier",
                        {
                            "type": "llm_judge",
                            "model": {
                                "name": "judge",
                                "engine": "openai",
                                "openai": {
                                    "base_url": f"http://127.0.0.1:{port}/v1",
                                    "tokenizer": C.EMBEDDED_MODEL,
                                    "api_key_env": KEY_ENV,
                                    "retries": 1,
                                    "backoff_s": 0.1,
                                },
                            },
                        },
                    ],
                    "subset": "all",
                },
            }
        )
    )  # every candidate goes to the judge, contested or not
    flywheel_bin = Path(sys.executable).with_name("flywheel")
    env = {**os.environ, "PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "prefect"), KEY_ENV: KEY}
    p = subprocess.run(
        [str(flywheel_bin), "run", "--config", str(cfg), "--workspace", str(ws)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert f"endpoint http://127.0.0.1:{port}/v1 failed after 2 tries: ConnectError" in last
    assert KEY not in p.stderr + p.stdout
    con = duckdb.connect(str(ws / "catalog.duckdb"), read_only=True)
    assert con.sql("SELECT round, status FROM rounds ORDER BY round").fetchall() == [(0, "completed"), (1, "failed")]
    assert con.execute("SELECT count(*) FROM candidates WHERE round = 1").fetchall()[0][0] == 4
    run_id = con.execute("SELECT DISTINCT run_id FROM rounds").fetchall()[0][0]
    con.close()
    assert not list((ws / "tables").glob("judgments/*/round=1/*.parquet"))

    # The server comes back (one without log-probs: verdicts are sampled): the resumed run redoes
    # the judge stage and what follows, and keeps the candidates it had.
    candidates = next((ws / "tables").glob("candidates/*/round=1/*.parquet"))
    before = candidates.stat().st_mtime_ns
    Faulty.mode, Faulty.hits = "ok", []
    with serving(Faulty, port):
        p = subprocess.run(
            [str(flywheel_bin), "run", "--resume", run_id, "--workspace", str(ws)],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            check=False,
        )
    assert p.returncode == 0, p.stderr[-3000:]
    assert Faulty.hits and candidates.stat().st_mtime_ns == before
    con = duckdb.connect(str(ws / "catalog.duckdb"), read_only=True)
    assert con.execute("SELECT status FROM rounds WHERE round = 1").fetchall() == [("completed",)]
    assert con.execute(
        "SELECT model, method FROM judge_health WHERE source = 'llm_judge' AND round = 1 LIMIT 1"
    ).fetchall() == [(f"openai:http://127.0.0.1:{port}/v1#judge", "sampled_8")]
    con.close()
