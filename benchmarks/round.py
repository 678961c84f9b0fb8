"""Speed of the embedded default, stage by stage, against the implementation it replaced (same run).

    .venv/bin/python benchmarks/round.py [--prompts 64] [--skip-round] [--only peak|generate|judge|train]
    .venv/bin/python benchmarks/round.py --memory-only

Measured in this process, on this machine, each next to its baseline:
  peak       fp32 matmul GFLOP/s of this CPU (the bound the others are a fraction of)
  generate   the default round's sampling (64 prompts × 8 samples): transformers' generate() at batch 64
             (the old stage) vs flywheel's continuous-batching decoder at the configured batch; tokens/s;
             and how many samples the decoder repeats exactly at batch 64
  benchmark  greedy on the 200 held-out items, old vs new; and whether every answer is identical
  judge      the LLM judge on the sampled candidates: rubric-prefix cache only at batch 16 (old) vs
             per-question prefixes at the configured batch; candidates/s and the largest score change;
             and the same in bf16 (model.dtype: bfloat16), its verdicts against fp32's
  train      DPO (LoRA) on 38 pairs, 2 epochs: reference log-probs every step and the output layer
             at every position (old) vs precomputed once and the output layer at the labelled
             positions only (new); seconds, the FLOP estimates, the achieved fraction of the fp32 peak
  train RSS  this (orchestrating) process's peak memory while training in-process vs while a
             launched job (accelerate launch) trains: the job holds the model, not the stage
  round      one default round with the new code, each stage's seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import tempfile
import time
from pathlib import Path


def peak_gflops(seconds: float = 3.0, dtype: str = "float32") -> float:
    import torch

    a, b = torch.randn(2048, 2048, dtype=getattr(torch, dtype)), torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9


def row(name: str, old: float, new: float, unit: str, extra: str = "") -> None:
    print(f"  {name:<10} old {old:8.1f} {unit:<13} new {new:8.1f} {unit:<13} {new / old:5.2f}x  {extra}")


def sampling_and_benchmark(n_prompts: int) -> list:
    from flywheel.config import FlywheelConfig
    from flywheel.models import loading
    from flywheel.models.hf import reference, sampling
    from flywheel.models.tasks.splits import benchmark_items, make_source, train_items

    cfg = FlywheelConfig()
    s, b = cfg.sampling, cfg.benchmark
    model, tok = loading.load(loading.resolve(cfg.model.name))
    source = make_source(cfg.task)
    items = train_items(source, 1, n_prompts, 0, None)[0]
    prompts = [it.prompt for it in items]
    sampling.generate(model, tok, prompts[:2], n=2, max_new_tokens=4, batch_size=4, do_sample=True)  # warm-up
    sample = {
        "max_new_tokens": s.max_new_tokens,
        "do_sample": True,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "seed": 0,
    }
    t0 = time.perf_counter()
    old = reference.generate_reference(model, tok, [p for p in prompts for _ in range(s.n)], batch_size=64, **sample)
    t_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = sampling.generate(model, tok, prompts, n=s.n, batch_size=s.batch_size, **sample)
    t_new = time.perf_counter() - t0
    gen_rate = sampling.tokens_per_second(new, t_new)
    row(
        "generate",
        sampling.tokens_per_second(old, t_old),
        gen_rate,
        "tokens/s",
        f"({len(new)} samples; {t_old:.1f} s → {t_new:.1f} s; batch 64 → {s.batch_size})",
    )
    other = sampling.generate(model, tok, prompts, n=s.n, batch_size=64, **sample)
    same = sum(a.response == b.response for a, b in zip(new, other))
    print(
        f"  {'':<10} the same seeds at batch 64 instead of {s.batch_size}: {same}/{len(new)} samples identical "
        "(the rest differ by the logits' rounding)"
    )
    bench_items = benchmark_items(source, b.size, 0)
    bench = [it.prompt for it in bench_items]
    greedy = {"max_new_tokens": b.max_new_tokens, "do_sample": False}
    t0 = time.perf_counter()
    g_old = reference.generate_reference(model, tok, bench, batch_size=64, **greedy)
    t_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    g_new = sampling.generate(model, tok, bench, batch_size=b.batch_size, **greedy)
    bench_rate = sampling.tokens_per_second(g_new, time.perf_counter() - t0)
    same = sum(x.response == y.response for x, y in zip(g_old, g_new))
    row(
        "benchmark",
        sampling.tokens_per_second(g_old, t_old),
        bench_rate,
        "tokens/s",
        f"(greedy, {len(bench)} items: {same}/{len(bench)} answers identical)",
    )
    # model.dtype: bfloat16 (opt-in): sampling and greedy speed, and exact match on the same items,
    # scored as the benchmark stage scores them
    import copy

    import torch

    from flywheel.tasks.benchmark import score_rows, summarize

    def exact(gens) -> float:
        return summarize(score_rows(bench_items, gens, source, run_id="bench", round_=0, model="m", suite="round.py"))[
            "exact_match"
        ]

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    sampling.generate(bf16, tok, prompts[:2], n=2, max_new_tokens=4, batch_size=4, do_sample=True)  # warm-up
    t0 = time.perf_counter()
    low = sampling.generate(bf16, tok, prompts, n=s.n, batch_size=s.batch_size, **sample)
    row(
        "gen bf16",
        gen_rate,
        sampling.tokens_per_second(low, time.perf_counter() - t0),
        "tokens/s",
        "(model.dtype bfloat16 vs fp32, the new decoder both)",
    )
    t0 = time.perf_counter()
    g_low = sampling.generate(bf16, tok, bench, batch_size=b.batch_size, **greedy)
    row(
        "bench bf16",
        bench_rate,
        sampling.tokens_per_second(g_low, time.perf_counter() - t0),
        "tokens/s",
        f"(greedy: exact match fp32 {exact(g_new):.1%}, bf16 {exact(g_low):.1%}; "
        f"{sum(x.response == y.response for x, y in zip(g_new, g_low))}/{len(bench)} answers identical)",
    )
    return [(prompts[i // s.n], g.response) for i, g in enumerate(new)]


def judge(candidates: list, peak: float) -> None:
    from flywheel.config import FlywheelConfig
    from flywheel.models import loading
    from flywheel.models.hf import reference
    from flywheel.models.rewards.rubric import load_rubric

    cfg = FlywheelConfig()
    model, tok = loading.load(loading.resolve(cfg.model.name))
    rubric = load_rubric()
    qs, rs = [q for q, _ in candidates], [r for _, r in candidates]
    # What each candidate computes after the shared prefixes (the rubric's start once, each
    # question's part once for its candidates): its response and the rubric's closing lines.
    from flywheel.models.generation import rendered_prompts
    from flywheel.models.hf.decode import common_prefix_len

    ids = rendered_prompts(
        tok, rubric, [{"question": q, "response": r} for q, r in candidates], cfg.judge.max_prompt_tokens
    )
    p0, groups = common_prefix_len(ids), {}
    for q, t in zip(qs, ids):
        groups.setdefault(q, []).append(t[p0:])
    own = sum(sum(len(t) - (common_prefix_len(ts) if len(ts) > 1 else 0) for t in ts) for ts in groups.values()) / len(
        ids
    )
    text = tok.decode(ids[0])
    end = text.rfind(rs[0])  # -1 if decoding does not give the response back verbatim
    closing = len(tok(text[end + len(rs[0]) :], add_special_tokens=False)["input_ids"]) if end >= 0 else -1
    body = sum(p.numel() for p in model.parameters()) - model.get_output_embeddings().weight.numel()
    gflop = 2 * body * own / 1e9
    print(
        f"  {'':<10} per candidate after the shared prefixes: {own:.1f} tokens (the rubric's closing lines "
        f"{closing} of them), {gflop:.1f} GFLOP: at most {peak / gflop:.1f} candidates/s at the fp32 peak"
    )
    t0 = time.perf_counter()
    old = reference.llm_judge(model, tok, rubric, qs, rs, batch_size=16, max_prompt_tokens=1024, by_question=False)
    t_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = reference.llm_judge(
        model, tok, rubric, qs, rs, batch_size=cfg.judge.batch_size, max_prompt_tokens=cfg.judge.max_prompt_tokens
    )
    t_new = time.perf_counter() - t0
    same = sum(a.parse_ok == b.parse_ok for a, b in zip(old, new))
    diff = max((abs(a.score - b.score) for a, b in zip(old, new) if a.parse_ok and b.parse_ok), default=0.0)
    row(
        "judge",
        len(qs) / t_old,
        len(qs) / t_new,
        "candidates/s",
        f"(every candidate; same parse {same}/{len(qs)}, largest score change {diff:.1e})",
    )
    # model.dtype: bfloat16 (opt-in): the same candidates, against the fp32 verdicts above
    import copy

    import torch

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    reference.llm_judge(bf16, tok, rubric, qs[:16], rs[:16], batch_size=16, max_prompt_tokens=1024)  # warm-up
    t0 = time.perf_counter()
    low = reference.llm_judge(
        bf16, tok, rubric, qs, rs, batch_size=cfg.judge.batch_size, max_prompt_tokens=cfg.judge.max_prompt_tokens
    )
    t_low = time.perf_counter() - t0
    same = sum(a.parse_ok == b.parse_ok for a, b in zip(new, low))
    d = [abs(a.score - b.score) for a, b in zip(new, low) if a.parse_ok and b.parse_ok]
    row(
        "judge bf16",
        len(qs) / t_new,
        len(qs) / t_low,
        "candidates/s",
        f"(model.dtype bfloat16 vs fp32, the new path both: same parse {same}/{len(qs)}, score change mean "
        f"{sum(d) / max(1, len(d)):.3f}, largest {max(d, default=0.0):.3f})",
    )


def train(peak: float) -> None:
    """DPO on 38 pairs, the old way and the new, the same inputs.

    The FLOP estimate counts the real (unpadded) tokens: forward 2·P per token, the backward
    through LoRA's frozen weights about one forward again, the reference's forward once per
    epoch (old) or once in all (new). Two ways of counting P: "model FLOPs" (every parameter,
    the tied embedding as the output layer at every position, the usual count of a model's
    FLOPs) and "needed" (the output layer only where a completion token's log-prob is used,
    which is all DPO reads)."""
    from flywheel import compat
    from flywheel.config import load_config
    from flywheel.models import loading
    from flywheel.models.tasks.splits import make_source, train_items
    from flywheel.models.training import trainer

    cfg = load_config()
    base = loading.resolve(cfg.model.name)
    items = train_items(make_source(cfg.task), 1, 38, 0, None)[0]
    rng = random.Random(0)
    wrong = [
        "The final answer to this arithmetic problem is 12.",
        "I think 3.",
        "Let's calculate it step by step: first we add the numbers and get 17, so the answer is 17.",
    ]
    rows = [
        {"prompt": it.prompt, "chosen": f"The final answer is {it.answer}.", "rejected": rng.choice(wrong)}
        for it in items
    ]
    model, tok = loading.load(base)
    from flywheel.models.hf.sampling import chat_texts

    heads = [len(tok(h, add_special_tokens=False)["input_ids"]) for h in chat_texts(tok, [r["prompt"] for r in rows])]
    completions = sum(len(tok(r["chosen"])["input_ids"]) + len(tok(r["rejected"])["input_ids"]) + 2 for r in rows)
    tokens = sum(2 * h for h in heads) + completions
    epochs = cfg.train.dpo["num_train_epochs"]
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()

    def estimate(ref_passes: int, needed: bool) -> float:
        per_pass = 2 * (params - head) * tokens + 2 * head * completions if needed else 2 * params * tokens
        return (2 * per_pass * epochs + per_pass * ref_passes) / 1e9

    results, peaks = {}, [peak]
    # precomputed: the reference's log-probs computed once, TRL's own projection of every position
    variants = (("old", False, False), ("precomputed", True, False), ("new", True, True))
    for label, precompute, compact in variants:
        dpo = {**cfg.train.dpo, "precompute_ref_log_probs": precompute}
        train_cfg = cfg.train.model_copy(update={"dpo": dpo})
        # old: TRL's own choice on the CPU, the output layer at every position
        choice = contextlib.nullcontext() if compact else compat.trl_own_lm_head_choice()
        with choice, tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            m = trainer.train(base, rows, train_cfg, Path(d) / "out", base=base, seed=0)
            results[label] = (time.perf_counter() - t0, m["train_loss"], 1 if precompute else epochs)
        peaks.append(peak_gflops())
    best = max(peaks)
    (t_old, l_old, r_old), (t_new, l_new, r_new) = results["old"], results["new"]
    t_pre, l_pre, _ = results["precomputed"]
    f_model, f_needed = estimate(r_new, False), estimate(r_new, True)
    row("train", t_old, t_new, "s (less=better)", f"(38 pairs, {epochs} epochs, loss {l_old:.4f} vs {l_new:.4f})")
    print(
        f"  {'':<10} of which the labelled positions alone: {t_pre:.1f} s with the reference precomputed and every "
        f"position projected → {t_new:.1f} s (loss {l_pre:.4f} vs {l_new:.4f})"
    )
    print(
        f"  {'':<10} FLOP estimate: {f_model:.0f} GFLOP model FLOPs, {f_needed:.0f} GFLOP needed; fp32 peak "
        f"{min(peaks):.0f}–{best:.0f} GFLOP/s across the run ({len(peaks)} measurements), the best used"
    )
    print(
        f"  {'':<10} achieved, load, merge and save included: new {f_model / t_new / best:.0%} (model FLOPs), "
        f"{f_needed / t_new / best:.0%} (needed); old {estimate(r_old, False) / t_old / best:.0%} (model FLOPs)"
    )


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_during(fn) -> tuple[float, object]:
    """This process's peak resident memory (MiB, sampled every 20 ms) while fn() runs, and fn's result."""
    import threading

    peak, done = [_rss_mib()], threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _rss_mib())

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    return peak[0], result


def train_memory() -> None:
    """The orchestrating process's memory while a round trains: in-process (train.num_processes 1)
    vs a launched job (accelerate launch, 1 process), on 38 pairs; no model loaded before either."""
    import gc

    from flywheel.config import load_config
    from flywheel.models import engines, loading
    from flywheel.models.training import trainer

    cfg = load_config()
    base = loading.resolve(cfg.model.name)
    rows = [
        {"prompt": f"What is {a} + {b}?", "chosen": f"The final answer is {a + b}.", "rejected": "I think 3."}
        for a in range(7)
        for b in range(6)
    ][:38]
    engines.release()
    loading.load.cache_clear()
    gc.collect()
    out = {}
    for label in ("launched", "in-process"):
        with tempfile.TemporaryDirectory() as d:
            before = _rss_mib()
            if label == "launched":
                run = lambda: trainer.launch(  # noqa: E731 - one name for either call, timed below
                    base,
                    rows,
                    cfg.train,
                    Path(d) / "out",
                    base=base,
                    seed=0,
                    dtype="auto",
                    fingerprint="mem",
                    checkpoint_steps=100,
                    mlflow_run_id=None,
                    tracking_uri=None,
                )
            else:
                run = lambda: trainer.train(base, rows, cfg.train, Path(d) / "out", base=base, seed=0)  # noqa: E731
            t0 = time.perf_counter()
            peak, _ = _peak_rss_during(run)
            out[label] = (before, peak, time.perf_counter() - t0)
        gc.collect()
    (b_l, p_l, t_l), (b_i, p_i, t_i) = out["launched"], out["in-process"]
    print(
        f"  train RSS  orchestrating process while training 38 pairs: in-process peak {p_i:.0f} MiB "
        f"(+{p_i - b_i:.0f}, {t_i:.0f} s); launched job peak {p_l:.0f} MiB (+{p_l - b_l:.0f}, {t_l:.0f} s, "
        "the model lives in the job's process)"
    )


def reference_memory() -> None:
    """Peak memory of a full fine-tune against a reference model (DPO, 38 pairs, 1 epoch): TRL's
    default keeps the reference model for the whole training; with precompute_ref_log_probs
    flywheel frees it once its log-probs are in the dataset. Each variant in a fresh process, so
    neither inherits the other's allocator state."""
    import json
    import subprocess
    import sys

    out = {}
    for label in ("kept", "precomputed"):
        p = subprocess.run(
            [sys.executable, __file__, "--reference-child", label], capture_output=True, text=True, check=True
        )
        out[label] = json.loads(p.stdout.strip().splitlines()[-1])
    k, p = out["kept"], out["precomputed"]
    print(
        f"  reference  full DPO fine-tune, 38 pairs, 1 epoch, peak RSS above the loaded process: reference model "
        f"kept +{k['mib']:.0f} MiB ({k['reference']}, {k['s']:.0f} s, loss {k['loss']:.4f}); precomputed "
        f"+{p['mib']:.0f} MiB ({p['reference']}, {p['s']:.0f} s, loss {p['loss']:.4f}): {p['mib'] / k['mib']:.2f}×"
    )


def _reference_child(label: str) -> None:
    import json

    from flywheel.config import load_config
    from flywheel.models import loading
    from flywheel.models.training import trainer

    cfg = load_config()
    base = loading.resolve(cfg.model.name)
    rows = [
        {"prompt": f"What is {a} + {b}?", "chosen": f"The final answer is {a + b}.", "rejected": "I think 3."}
        for a in range(7)
        for b in range(6)
    ][:38]
    train_cfg = cfg.train.model_copy(
        update={
            "lora": False,
            "reference": "base",
            "dpo": {**cfg.train.dpo, "num_train_epochs": 1, "precompute_ref_log_probs": label == "precomputed"},
        }
    )
    with tempfile.TemporaryDirectory() as d:
        before = _rss_mib()
        t0 = time.perf_counter()
        peak, m = _peak_rss_during(lambda: trainer.train(base, rows, train_cfg, Path(d) / "out", base=base, seed=0))
    print(
        json.dumps(
            {
                "mib": peak - before,
                "s": time.perf_counter() - t0,
                "loss": m["train_loss"],
                "reference": m["train_reference"],
            }
        )
    )


def one_round() -> None:
    from flywheel.config import load_config
    from flywheel.flows.flywheel import flywheel
    from flywheel.flows.server import prefect_api

    with tempfile.TemporaryDirectory() as ws, prefect_api():
        t0 = time.perf_counter()
        result = flywheel(load_config(None, {"rounds": 1, "workspace": ws, "name": "bench-round"}))
        total = time.perf_counter() - t0
    r0, r1 = result["rounds"]
    print("one default round (embedded SmolLM2-135M, CPU), new code")
    print(f"  round-0 benchmark : {r0['benchmark_seconds']:7.1f} s  ({r0['benchmark_tokens_per_s']:.1f} tokens/s)")
    for stage in ("generate", "judge", "curate", "train", "benchmark"):
        extra = ""
        if stage in ("generate", "benchmark"):
            extra = f"  ({r1[f'{stage}_tokens_per_s']:.1f} tokens/s)"
        if stage == "judge":
            extra = f"  ({r1['candidates'] / r1['judge_seconds']:.1f} candidates/s)"
        if stage == "curate":
            extra = f"  ({r1['pairs']} pairs)"
        print(f"  {stage:<17} : {r1[f'{stage}_seconds']:7.1f} s{extra}")
    print(f"  whole run         : {total:7.1f} s   accuracy {r0['accuracy']:.1%} → {r1['accuracy']:.1%}")


if __name__ == "__main__":
    from flywheel.flows.cli import quiet_libraries

    quiet_libraries()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--skip-round", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the training memory measurement")
    ap.add_argument(
        "--only",
        choices=("peak", "generate", "judge", "train"),
        help="the peaks and one stage (judge samples its candidates first)",
    )
    ap.add_argument("--reference-child", choices=("kept", "precomputed"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference_child:
        _reference_child(args.reference_child)
        raise SystemExit(0)
    if args.memory_only:
        train_memory()
        reference_memory()
        raise SystemExit(0)
    peak = max(peak_gflops(1.0) for _ in range(3))  # best of three: this machine's neighbours vary it by 2x
    bf16_peak = max(peak_gflops(1.0, "bfloat16") for _ in range(3))
    print(f"fp32 matmul peak of this CPU: {peak:.0f} GFLOP/s (bf16: {bf16_peak:.0f} GFLOP/s, {bf16_peak / peak:.2f}x)")
    if args.only == "peak":
        raise SystemExit(0)
    print("stage by stage, old implementation vs new, same inputs, same process")
    if args.only == "train":
        train(peak)
        raise SystemExit(0)
    cands = sampling_and_benchmark(args.prompts)
    if args.only == "generate":
        raise SystemExit(0)
    judge(cands, peak)
    if args.only == "judge":
        raise SystemExit(0)
    train(peak)
    train_memory()
    reference_memory()
    if not args.skip_round:
        one_round()
