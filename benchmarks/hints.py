"""How often a hint makes a right answer: a kept run's model on its own training prompts, sampled with
and without sampling.hint's template, by the sign of the reference answer.

    .venv/bin/python benchmarks/efficacy.py --seeds 0 --rounds 10 --keep /tmp/base10     # a kept run
    .venv/bin/python benchmarks/hints.py --workspace /tmp/base10/seed-0 --round 3

Takes the first --prompts training prompts of rounds 1-4 whose reference answer is below zero and as
many of the rest, samples each --samples times with the round's model (its checkpoint; round 0: the
run's base model) at each --temperatures, with and without the hint, and prints, per case, the share
of samples the task's verifier finds right and the prompts with at least one right sample, and of
those, the ones that show their work (sampling.hint.require_work keeps only these) and the right
samples that work in steps (two or more `=`, as in "95 - 57 = 95 - 50 - 7 = 38").
Each --template is tried beside the prompt without a hint (default: sampling.hint's template).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> None:
    from flywheel.flows.cli import _positive_int

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True, help="a kept run's workspace (efficacy.py --keep)")
    ap.add_argument("--round", type=int, default=3, help="whose model samples (0: the base model)")
    ap.add_argument("--prompts", type=int, default=40, help="prompts per answer sign")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    ap.add_argument("--max-new-tokens", type=_positive_int, help="default: the run's sampling.max_new_tokens")
    ap.add_argument(
        "--template",
        action="append",
        help="a hint template to try ({prompt}, {answer}; repeat to compare); default: sampling.hint's",
    )
    args = ap.parse_args()

    from flywheel.config import HintConfig, load_config
    from flywheel.models import engines
    from flywheel.models.tasks import Item, exactly_correct
    from flywheel.models.tasks.splits import make_source
    from flywheel.storage import catalog

    ws = args.workspace
    if not (ws / "runs").is_dir():
        raise SystemExit(f"hints: {ws} is not a flywheel workspace (no runs/ folder)")
    catalog.refresh(ws)
    rounds = catalog.query(ws, "SELECT run_id, round, policy_out FROM rounds ORDER BY round").to_pylist()
    run_id = rounds[0]["run_id"]
    config = load_config(ws / "runs" / run_id / "config.yaml")
    ref = next((r["policy_out"] for r in rounds if r["round"] == args.round and args.round > 0), None)
    if args.round > 0 and not ref:
        raise SystemExit(f"hints: round {args.round} has no checkpoint in {ws}")
    ref = ref or engines.model_ref(config.model)
    rows = catalog.query(
        ws,
        "SELECT DISTINCT prompt, answer, task FROM prompts WHERE split = 'train' AND round BETWEEN 1 AND 4 "
        "ORDER BY prompt",
    ).to_pylist()
    neg = [r for r in rows if r["answer"].startswith("-")][: args.prompts]
    rest = [r for r in rows if not r["answer"].startswith("-")][: args.prompts]
    source = make_source(config.task)
    templates = args.template or [HintConfig().template]
    for t in templates:
        HintConfig(template=t)  # a bad one is a one-line error before any model loads
    engine, k = engines.open_engine(config.model, ref), args.samples
    print(f"round {args.round}'s model ({ref}); {args.samples} samples a prompt")
    for i, t in enumerate(templates, 1):
        print(f"hint {i}: {t!r}")
    for name, group in (("answers below zero", neg), ("the rest", rest)):
        items = [Item(r["prompt"], r["answer"], r["task"]) for r in group]
        for label, template in [("no hint", None), *((f"hint {i}", t) for i, t in enumerate(templates, 1))]:
            texts = [template.format(prompt=it.prompt, answer=it.answer) if template else it.prompt for it in items]
            for t in args.temperatures:
                gens = engine.sample(
                    texts,
                    n=args.samples,
                    max_new_tokens=args.max_new_tokens or config.sampling.max_new_tokens,
                    temperature=t,
                    top_p=1.0,
                    seed=1,
                    batch_size=config.sampling.batch_size,
                )
                right = [exactly_correct(source.evaluate(g.response, items[i // k])[1]) for i, g in enumerate(gens)]
                work = [r and source.shows_work(g.response, items[i // k]) for i, (r, g) in enumerate(zip(right, gens))]
                steps = sum(r and g.response.count("=") >= 2 for r, g in zip(right, gens))
                prompts = sum(any(right[i * k : (i + 1) * k]) for i in range(len(items)))
                with_work = sum(any(work[i * k : (i + 1) * k]) for i in range(len(items)))
                print(
                    f"  {name:<18} {label:<7} T={t}: {sum(right) / len(right):6.1%} of samples right "
                    f"({sum(work) / len(work):.1%} showing their work, {steps / len(right):.1%} in steps); "
                    f"{prompts}/{len(items)} prompts with a "
                    f"right sample ({with_work} showing its work)"
                )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
