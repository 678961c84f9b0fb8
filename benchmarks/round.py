"""Speed of one default round, and batched vs one-at-a-time generation.

    .venv/bin/python benchmarks/round.py [--prompts 64] [--skip-round]

Prints (1) tokens/s of batched generation against a one-prompt-at-a-time loop on the same
prompts, measured in this run, and their ratio; (2) each stage's time for one default round
of the flywheel on the embedded model (round 0's benchmark of the base model included).
"""

from __future__ import annotations

import argparse
import tempfile
import time


def generation_speed(n_prompts: int) -> None:
    from flywheel.config import FlywheelConfig
    from flywheel.models import loading, sampling
    from flywheel.models.tasksource import make_source, train_items

    cfg = FlywheelConfig()
    model, tok = loading.load(loading.resolve(cfg.model.name))
    prompts = [it.prompt for it in train_items(make_source(cfg.task), 1, n_prompts, 0, None)[0]]
    kw = dict(max_new_tokens=cfg.sampling.max_new_tokens, do_sample=False)
    sampling.generate(model, tok, prompts[:2], batch_size=2, **kw)  # warm-up
    t0 = time.perf_counter()
    one = sampling.generate(model, tok, prompts, batch_size=1, **kw)
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = sampling.generate(model, tok, prompts, batch_size=cfg.sampling.batch_size, **kw)
    t_batch = time.perf_counter() - t0
    r_one, r_batch = sampling.tokens_per_second(one, t_one), sampling.tokens_per_second(batched, t_batch)
    same = sum(a.response == b.response for a, b in zip(one, batched)) / len(one)
    print(f"generation, {n_prompts} prompts, greedy, max_new_tokens={kw['max_new_tokens']}")
    print(f"  one at a time : {r_one:8.1f} tokens/s  ({t_one:.1f} s)")
    print(f"  batched ({cfg.sampling.batch_size:>3}) : {r_batch:8.1f} tokens/s  ({t_batch:.1f} s)")
    print(f"  speed-up      : {r_batch / r_one:8.2f}x   (identical responses: {same:.0%})")


def one_round() -> None:
    from flywheel.config import load_config
    from flywheel.flows.flywheel import flywheel

    with tempfile.TemporaryDirectory() as ws:
        t0 = time.perf_counter()
        result = flywheel(load_config(None, {"rounds": 1, "workspace": ws, "name": "bench-round"}))
        total = time.perf_counter() - t0
    r0, r1 = result["rounds"]
    print("one default round (embedded SmolLM2-135M, CPU)")
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
    import os

    from flywheel.flows.cli import quiet_libraries

    quiet_libraries()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--skip-round", action="store_true")
    args = ap.parse_args()
    generation_speed(args.prompts)
    if not args.skip_round:
        one_round()
