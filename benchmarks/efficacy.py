"""Does the default experiment generalise? The default 3-round run (or a preset) for several seeds.

Per seed and as mean ± sd over seeds: test exact match per round, the last round's paired gain
over the starting model on the test split with its 95% interval, the guard suites' accuracy, the
validation-vs-test gap, pairs per round, and time. Each seed runs in its own workspace.

    .venv/bin/python benchmarks/efficacy.py                      # the default, seeds 0 1 2
    .venv/bin/python benchmarks/efficacy.py --preset label_free
    .venv/bin/python benchmarks/efficacy.py --seeds 0 --keep /tmp/efficacy   # keep the workspaces
    .venv/bin/python benchmarks/efficacy.py --seeds 2 --set promotion.guard_rule=point   # a setting changed
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def run_seed(seed: int, preset: str | None, workspace: Path, overrides: dict | None = None) -> dict:
    from flywheel.config import load_config
    from flywheel.flows.flywheel import flywheel
    from flywheel.flows.server import prefect_api
    from flywheel.storage import catalog
    from flywheel.tasks import promote
    from flywheel.tasks.benchmark import suite_names

    config = load_config(
        None,
        {**(overrides or {}), "seed": seed, "workspace": str(workspace), "name": f"efficacy-{seed}"},
        preset=preset,
    )
    t0 = time.perf_counter()
    with prefect_api():
        result = flywheel(config)
    seconds = time.perf_counter() - t0
    rounds = result["rounds"]
    _, test_suite = suite_names(config)
    first, last = (round_rows(workspace, result["run_id"], k) for k in (0, rounds[-1]["round"]))
    gain = promote.paired_gains(last, first, seed=seed, suite=test_suite)
    # the run's result: its champion (the last promoted round; round 0 when none was)
    champ = max([r["round"] for r in rounds[1:] if r["promoted"]], default=0)
    champ_rows = round_rows(workspace, result["run_id"], champ)
    champ_gain = promote.paired_gains(champ_rows, first, seed=seed, suite=test_suite)
    guards = sorted(k.removeprefix("guard_accuracy.") for k in rounds[0] if k.startswith("guard_accuracy."))
    catalog.refresh(workspace)
    return {
        "seed": seed,
        "seconds": seconds,
        "chosen_right": chosen_right(workspace),
        "test": [r["exact_match"] for r in rounds],
        "validation": [r.get("validation_exact_match") for r in rounds],
        "pairs": [r.get("pairs") for r in rounds[1:]],
        "promoted": [r["promoted"] for r in rounds[1:]],
        "gain": (gain.get("exact_match_gain"), gain.get("exact_match_gain_low"), gain.get("exact_match_gain_high")),
        "champion": champ,
        "champion_gain": (
            champ_gain.get("exact_match_gain"),
            champ_gain.get("exact_match_gain_low"),
            champ_gain.get("exact_match_gain_high"),
        ),
        "guards": {g: (rounds[0][f"guard_accuracy.{g}"], rounds[-1][f"guard_accuracy.{g}"]) for g in guards},
        # each guard's mean-score change from round 0, paired over its items, with its 95% interval:
        # the last round's and the champion's
        "guard_gains": {
            g: tuple(_mean_gain(rows, first, seed, f"guard:{g}") for rows in (last, champ_rows)) for g in guards
        },
    }


def round_rows(workspace: Path, run_id: str, round_: int) -> list[dict]:
    """Every benchmark row of a round: the test split, the validation split and each guard suite
    (each suite is its own part file of the round's partition)."""
    from flywheel.storage import parquet

    return parquet.read_parts(workspace, "benchmarks", run_id, round_)


def _mean_gain(rows: list[dict], first: list[dict], seed: int, suite: str) -> tuple | None:
    from flywheel.tasks import promote

    g = promote.paired_gains(rows, first, seed=seed, suite=suite)
    return (g["accuracy_gain"], g["accuracy_gain_low"], g["accuracy_gain_high"]) if g else None


def points(g: tuple | None) -> str:
    return "–" if g is None else f"{g[0] * 100:+.1f} [{g[1] * 100:+.1f}, {g[2] * 100:+.1f}]"


def chosen_right(workspace: Path) -> list[float | None]:
    """Per round: the share of pairs whose chosen response gives the prompt's reference answer (checked
    afterwards, against answers a label-free run never sees)."""
    from flywheel.models.rewards import extracted_answer
    from flywheel.storage import catalog

    rows = catalog.query(
        workspace,
        "SELECT p.round, p.chosen, q.answer FROM pairs p JOIN prompts q "
        "ON q.prompt_id = p.prompt_id AND q.round = p.round",
    ).to_pylist()
    out = []
    for k in sorted({r["round"] for r in rows}):
        rs = [r for r in rows if r["round"] == k and r["answer"] is not None]
        ok = sum(extracted_answer(r["chosen"], r["answer"]) == extracted_answer(r["answer"], r["answer"]) for r in rs)
        out.append(ok / len(rs) if rs else None)
    return out


def settings(pairs: list[str]) -> dict:
    """["promotion.guard_rule=point", "train.dpo.beta=0.2"] → nested overrides, values read as YAML."""
    import yaml

    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"efficacy: --set {pair!r}: expected KEY=VALUE")
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return out


def pct(x) -> str:
    return "–" if x is None else f"{x:.1%}"


def mean_sd(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs) * 100:.1f} ± {sd * 100:.1f}"


def report(results: list[dict]) -> None:
    for r in results:
        g, low, high = r["gain"]
        print(
            f"seed {r['seed']}: test exact match by round {' → '.join(pct(x) for x in r['test'])}; "
            f"validation {' → '.join(pct(x) for x in r['validation'])}; promoted {r['promoted']}"
        )
        print(
            f"  last round vs round 0 (test, paired): {g * 100:+.1f} points, 95% interval "
            f"[{low * 100:+.1f}, {high * 100:+.1f}]"
            if g is not None
            else "  no paired gain (unscored)"
        )
        cg, clow, chigh = r["champion_gain"]
        if r["champion"] and cg is not None:
            print(
                f"  the run's champion (round {r['champion']}) vs round 0 (test, paired): {cg * 100:+.1f} points, "
                f"95% interval [{clow * 100:+.1f}, {chigh * 100:+.1f}]"
            )
        print(
            "  guards: "
            + ", ".join(f"{k} {pct(a)} → {pct(b)} ({(b - a) * 100:+.1f})" for k, (a, b) in r["guards"].items())
        )
        print(
            "  guards' mean-score change from round 0, paired (95% interval): last round "
            + ", ".join(f"{k} {points(last)}" for k, (last, _) in r["guard_gains"].items())
            + f"; champion (round {r['champion']}) "
            + ", ".join(f"{k} {points(ch)}" for k, (_, ch) in r["guard_gains"].items())
        )
        gap = r["validation"][-1] - r["test"][-1] if None not in (r["validation"][-1], r["test"][-1]) else None
        print(
            f"  validation − test, last round: {'–' if gap is None else f'{gap * 100:+.1f} points'}; "
            f"pairs per round {r['pairs']}; {r['seconds'] / 60:.1f} min"
        )
        print("  pairs whose chosen answer is right, by round: " + ", ".join(pct(x) for x in r["chosen_right"]))
    if len(results) > 1:
        n = len(results[0]["test"])
        print(f"over {len(results)} seeds (mean ± sd, points):")
        print("  test exact match by round: " + " → ".join(mean_sd([r["test"][k] for r in results]) for k in range(n)))
        print(
            f"  last round's paired gain: {mean_sd([r['gain'][0] for r in results])}; "
            f"its interval's low end: {mean_sd([r['gain'][1] for r in results])}"
        )
        print(f"  the champion's paired gain: {mean_sd([r['champion_gain'][0] for r in results])}")
        for k in results[0]["guards"]:
            print(
                f"  guard {k} change: last round {mean_sd([r['guards'][k][1] - r['guards'][k][0] for r in results])}"
                f", champion {mean_sd([(r['guard_gains'][k][1] or (None,))[0] for r in results])}"
            )
        print(f"  time: {statistics.fmean(r['seconds'] for r in results) / 60:.1f} min a run")


if __name__ == "__main__":
    from flywheel.flows.cli import quiet_libraries

    quiet_libraries()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default=None, help="a shipped config, e.g. label_free")
    ap.add_argument("--keep", type=Path, default=None, help="keep each seed's workspace under this folder")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting over the default's, dotted, YAML value: --set promotion.guard_rule=point",
    )
    args = ap.parse_args()
    overrides = settings(args.set)
    results = []
    for seed in args.seeds:
        if args.keep is not None:
            results.append(run_seed(seed, args.preset, args.keep / f"seed-{seed}", overrides))
        else:
            with tempfile.TemporaryDirectory() as ws:
                results.append(run_seed(seed, args.preset, Path(ws), overrides))
        report(results[-1:])
    report(results)
