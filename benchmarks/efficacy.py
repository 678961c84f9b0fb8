"""Does the default experiment generalise? The default 3-round run (or a preset) for several seeds.

Per seed and as mean ± sd over seeds: test exact match per round, the last round's and the
champion's paired gain over the starting model on the test split with its 95% interval (and over
round 3, in a longer run), the guard suites' accuracy, the transfer suites' exact match, the
validation-vs-test gap, pairs and samples per round, and time. Each seed runs in its own workspace.

    .venv/bin/python benchmarks/efficacy.py                      # the default, seeds 0 1 2
    .venv/bin/python benchmarks/efficacy.py --preset label_free
    .venv/bin/python benchmarks/efficacy.py --seeds 0 --keep /tmp/efficacy   # keep the workspaces
    .venv/bin/python benchmarks/efficacy.py --seeds 2 --set promotion.guard_rule=point   # a setting changed
    .venv/bin/python benchmarks/efficacy.py --rounds 10 --set sampling.frontier.pool=128   # ten rounds, a frontier
    .venv/bin/python benchmarks/efficacy.py --report-from /tmp/efficacy   # the kept workspaces, reported again

Every round also scores the task's variants (TRANSFER: three terms, three digits) unless
--set benchmark.transfer=[] says otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

# The task's variants scored every round (benchmark.transfer), unless --set benchmark.transfer=… says otherwise
TRANSFER = [
    {"name": "three_terms", "options": {"min_terms": 3, "max_terms": 3}},
    {"name": "three_digits", "options": {"min_digits": 3, "max_digits": 3}},
]


def run_seed(seed: int, preset: str | None, workspace: Path, overrides: dict | None = None) -> dict:
    from flywheel.config import load_config
    from flywheel.flows.flywheel import flywheel
    from flywheel.flows.server import prefect_api

    overrides = dict(overrides or {})
    bench = overrides.setdefault("benchmark", {})
    if "transfer" not in bench:
        bench["transfer"] = TRANSFER
    config = load_config(
        None,
        {**overrides, "seed": seed, "workspace": str(workspace), "name": f"efficacy-{seed}"},
        preset=preset,
    )
    with prefect_api():
        flywheel(config)
    return summary(workspace)


def summary(workspace: Path) -> dict:
    """What a finished run's workspace says, from its tables alone (so a kept workspace can be
    reported again: --report-from): test exact match per round, paired gains, guards, transfer
    suites, pairs and samples per round, time."""
    from flywheel.config import load_config
    from flywheel.storage import catalog
    from flywheel.tasks import promote
    from flywheel.tasks.benchmark import level_suite, suite_names, summarize

    catalog.refresh(workspace)
    rounds = catalog.query(
        workspace,
        "SELECT run_id, round, promoted, n_pairs, started_at, finished_at, curriculum_level FROM rounds "
        "WHERE status = 'completed' ORDER BY round",
    ).to_pylist()
    run_id = rounds[0]["run_id"]
    config = load_config(workspace / "runs" / run_id / "config.yaml")
    seed = config.seed
    v_suite, t_suite = suite_names(config)
    rows = {r["round"]: round_rows(workspace, run_id, r["round"]) for r in rounds}

    def em(k: int, suite: str):
        return summarize([r for r in rows[k] if r["suite"] == suite] or [{"score": None, "n_tokens": 0}])["exact_match"]

    def gain(k: int, j: int, suite: str = t_suite, key: str = "exact_match") -> tuple | None:
        g = promote.paired_gains(rows[k], rows[j], seed=seed, suite=suite)
        return (g[f"{key}_gain"], g[f"{key}_gain_low"], g[f"{key}_gain_high"]) if g else None

    last = rounds[-1]["round"]
    # the run's result: its champion (the last promoted round; round 0 when none was)
    champ = max([r["round"] for r in rounds[1:] if r["promoted"]], default=0)
    samples = {
        r["round"]: r["n"]
        for r in catalog.query(
            workspace, "SELECT round, count(*) AS n FROM candidates GROUP BY round ORDER BY round"
        ).to_pylist()
    }
    guards = [g.task for g in config.benchmark.guards]
    transfer = [t.name for t in config.benchmark.transfer]
    hinted_pairs = {
        r["round"]: r["n"]
        for r in catalog.query(
            workspace,
            "SELECT p.round, count(*) AS n FROM pairs p JOIN candidates c ON c.candidate_id = p.chosen_id "
            "WHERE c.sampling->>'hinted' = 'true' GROUP BY p.round",
        ).to_pylist()
    }
    # a curriculum's levels' test splits, level 0 being the task's own
    level_tests = (
        [t_suite] + [level_suite(config, k, "test") for k in range(1, len(config.task.curriculum.levels) + 1)]
        if config.task.curriculum is not None
        else None
    )
    return {
        "seed": seed,
        "seconds": sum((r["finished_at"] - r["started_at"]).total_seconds() for r in rounds),
        "chosen_right": chosen_right(workspace),
        "test": [em(r["round"], t_suite) for r in rounds],
        "validation": [em(r["round"], v_suite) for r in rounds],
        "pairs": [r["n_pairs"] for r in rounds[1:]],
        "samples": [samples.get(r["round"], 0) for r in rounds[1:]],
        "promoted": [r["promoted"] for r in rounds[1:]],
        "gain": gain(last, 0) or (None, None, None),
        "champion": champ,
        "champion_gain": gain(champ, 0) or (None, None, None),
        # the champion against round 3's model (a long run's question: does it keep improving?)
        "champion_over_3": gain(champ, 3) if last > 3 else None,
        "guards": {
            g: tuple(summarize([x for x in rows[k] if x["suite"] == f"guard:{g}"])["accuracy"] for k in (0, last))
            for g in guards
        },
        # each guard's mean-score change from round 0, paired over its items, with its 95% interval:
        # the last round's and the champion's
        "guard_gains": {g: tuple(gain(k, 0, f"guard:{g}", "accuracy") for k in (last, champ)) for g in guards},
        "transfer": {t: [em(r["round"], f"transfer:{t}") for r in rounds] for t in transfer},
        "transfer_gains": {t: gain(champ, 0, f"transfer:{t}") for t in transfer},
        "by_sign": by_sign(
            workspace, {r["round"]: [x for x in rows[r["round"]] if x["suite"] == t_suite] for r in rounds}
        ),
        "hinted_pairs": [hinted_pairs.get(r["round"], 0) for r in rounds[1:]] if config.sampling.hint else None,
        # a curriculum's run: the level each round trained at, and each level's test exact match by
        # round (level 0 is the task's own test split) with the champion's paired gain over round 0
        "levels": (
            {
                "trained_at": [r["curriculum_level"] for r in rounds[1:]],
                "test": {k: [em(r["round"], suite) for r in rounds] for k, suite in enumerate(level_tests)},
                "gains": {k: gain(champ, 0, suite) for k, suite in enumerate(level_tests)},
            }
            if level_tests is not None
            else None
        ),
    }


def by_sign(workspace: Path, test_rows: dict[int, list[dict]]) -> dict | None:
    """Per round, the test split's exact match on the items whose reference answer is below zero and
    on the rest (None when the answers are not numbers): a model that never writes a minus sign is
    capped at the second group's share."""
    from flywheel.storage import catalog

    answers = {
        r["prompt_id"]: r["answer"]
        for r in catalog.query(workspace, "SELECT DISTINCT prompt_id, answer FROM prompts").to_pylist()
    }
    try:
        negative = {k: float(v) < 0 for k, v in answers.items() if v is not None}
    except ValueError:
        return None
    out: dict = {"below_zero": [], "the_rest": [], "share_below_zero": None}
    for k in sorted(test_rows):
        rs = [x for x in test_rows[k] if x["item_id"] in negative and x["score"] is not None]
        neg = [x["score"] >= 1.0 for x in rs if negative[x["item_id"]]]
        pos = [x["score"] >= 1.0 for x in rs if not negative[x["item_id"]]]
        out["below_zero"].append(sum(neg) / len(neg) if neg else None)
        out["the_rest"].append(sum(pos) / len(pos) if pos else None)
        out["share_below_zero"] = len(neg) / len(rs) if rs else None
    return out


def round_rows(workspace: Path, run_id: str, round_: int) -> list[dict]:
    """Every benchmark row of a round: the test split, the validation split and each guard suite
    (each suite is its own part file of the round's partition)."""
    from flywheel.storage import parquet

    return parquet.read_parts(workspace, "benchmarks", run_id, round_)


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
        spent, made = sum(r["samples"]), sum(p or 0 for p in r["pairs"])
        print(
            f"  samples per round {r['samples']}; {spent} samples for {made} pairs: "
            + (f"{spent / made:.1f} samples a pair" if made else "no pair")
        )
        if r["champion_over_3"] is not None:
            print(f"  the champion (round {r['champion']}) vs round 3 (test, paired): {points(r['champion_over_3'])}")
        for t, ems in r["transfer"].items():
            print(
                f"  transfer {t}: exact match by round {' → '.join(pct(x) for x in ems)}; "
                f"champion vs round 0 (paired): {points(r['transfer_gains'][t])}"
            )
        sign = r.get("by_sign")
        if sign and sign["share_below_zero"]:
            print(
                f"  test exact match, answers below zero ({sign['share_below_zero']:.0%} of the items) / the rest, "
                "by round: " + " → ".join(f"{pct(a)} / {pct(b)}" for a, b in zip(sign["below_zero"], sign["the_rest"]))
            )
        if r.get("hinted_pairs") is not None:
            print(f"  pairs whose chosen response was a hinted sample, by round: {r['hinted_pairs']}")
        if r.get("levels") is not None:
            lv = r["levels"]
            print(f"  curriculum: the level each round trained at {lv['trained_at']}")
            for k, ems in lv["test"].items():
                print(
                    f"  level {k} test exact match by round {' → '.join(pct(x) for x in ems)}; "
                    f"champion vs round 0 (paired): {points(lv['gains'][k])}"
                )
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
        if all(r["champion_over_3"] is not None for r in results):
            print(f"  the champion's paired gain over round 3: {mean_sd([r['champion_over_3'][0] for r in results])}")
        for t in results[0]["transfer"]:
            print(
                f"  transfer {t} by round: "
                + " → ".join(mean_sd([r["transfer"][t][k] for r in results]) for k in range(n))
            )
        spent = sum(sum(r["samples"]) for r in results)
        made = sum(sum(p or 0 for p in r["pairs"]) for r in results)
        print(f"  {made} pairs from {spent} samples" + (f": {spent / made:.1f} samples a pair" if made else ""))


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
    ap.add_argument("--rounds", type=int, default=None, help="rounds a run (the default's 3 unless set)")
    ap.add_argument(
        "--report-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="report the kept workspaces under DIR (seed-*) again, running nothing",
    )
    args = ap.parse_args()
    if args.report_from is not None:
        kept = sorted(args.report_from.glob("seed-*"))
        if not kept:
            raise SystemExit(f"efficacy: no seed-* workspace under {args.report_from}")
        report([summary(ws) for ws in kept])
        raise SystemExit(0)
    overrides = settings(args.set)
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    results = []
    for seed in args.seeds:
        if args.keep is not None:
            results.append(run_seed(seed, args.preset, args.keep / f"seed-{seed}", overrides))
        else:
            with tempfile.TemporaryDirectory() as ws:
                results.append(run_seed(seed, args.preset, Path(ws), overrides))
        report(results[-1:])  # each seed as it finishes
    if len(results) > 1:
        report(results)  # every seed again, then the mean over seeds
