"""How often is a label-free pseudo-label right? The starting model's samples for round 1's
prompts, at several temperatures, scored against the task's answers (which the label-free preset
never sees).

    .venv/bin/python benchmarks/pseudo_labels.py [--temperatures 1.0 0.7 0.5] [--prompts 64] [--n 8]

Prints per temperature: the share of samples exactly right; how many prompts have a majority
answer holding ≥ 50% / any share of their samples, and how often that majority answer (TTRL's
pseudo-label) is right; pass@n; the mean response length; and the correlation of self-certainty
with length and with being right (the reasons the label-free rewards mislead at this model size).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import Counter


def corr(a, b) -> float:
    if len(a) < 2 or statistics.pstdev(a) == 0 or statistics.pstdev(b) == 0:
        return float("nan")
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / math.sqrt(
        sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args()

    from flywheel import config as C
    from flywheel.flows.flywheel import prepare
    from flywheel.models import engines, loading
    from flywheel.models.rewards import extracted_answer
    from flywheel.models.tasks.splits import train_items

    cfg = C.FlywheelConfig()
    prepared = prepare(cfg)
    source = prepared.source
    # round 1's draw as a run makes it: none overlapping the validation and test splits
    items = train_items(source, 1, args.prompts, cfg.seed, prepared.decontaminator()).items
    engine = engines.open_engine(cfg.model, loading.resolve(cfg.model.name))
    print(f"{len(items)} prompts of {cfg.task.name} × {args.n} samples, the starting model")
    print(
        "temperature  sample-exact  pass@n  prompts≥50%  right  all-prompts-majority-right  tokens  "
        "corr(certainty,len)  corr(certainty,right)  seconds"
    )
    for t in args.temperatures:
        t0 = time.perf_counter()
        gens = engine.sample(
            [it.prompt for it in items],
            n=args.n,
            max_new_tokens=cfg.sampling.max_new_tokens,
            temperature=t,
            top_p=cfg.sampling.top_p,
            seed=cfg.seed * 1000 + 1,
            batch_size=cfg.sampling.batch_size,
        )
        seconds = time.perf_counter() - t0
        right, certainty, length = [], [], []
        sure = sure_right = majority_right = passed = 0
        for i, it in enumerate(items):
            group = gens[i * args.n : (i + 1) * args.n]
            answers = [extracted_answer(g.response, it.answer) for g in group]
            ok = [source.score(a, it.answer, it.metadata) == 1.0 for a in answers]
            right += ok
            certainty += [g.self_certainty or 0.0 for g in group]
            length += [g.n_tokens for g in group]
            passed += any(ok)
            votes = Counter(a for a in answers if a is not None)
            if votes:
                label, count = votes.most_common(1)[0]
                hit = source.score(label, it.answer, it.metadata) == 1.0
                majority_right += hit
                if count / args.n >= 0.5:
                    sure += 1
                    sure_right += hit
        n = len(items)
        print(
            f"{t:11.2f}  {sum(right) / len(right):12.1%}  {passed / n:6.1%}  {sure:11d}  "
            f"{(sure_right / sure if sure else float('nan')):5.0%}  {majority_right / n:26.1%}  "
            f"{statistics.fmean(length):6.1f}  {corr(certainty, length):19.2f}  "
            f"{corr(certainty, [float(r) for r in right]):21.2f}  {seconds:7.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
