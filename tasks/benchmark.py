"""Stage 5, benchmarking: a model, greedy, on the held-out splits (test: reported; validation: the
promotion gate's), the guard suites and the transfer suites; accuracy (mean score), exact match and
mean length."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import progress, seeds
from flywheel.models import engines
from flywheel.models.hf import sampling
from flywheel.models.tasks import Item, exactly_correct
from flywheel.models.tasks.reasoning_gym import ReasoningGymSource
from flywheel.models.tasks.splits import Level, make_source, transfer_suites
from flywheel.storage import catalog, parquet
from flywheel.tasks import promote
from flywheel.tasks.common import StageContext, short_hash
from flywheel.tasks.generate import prompt_rows
from flywheel.tasks.promote import LEVEL_VALIDATION
from flywheel.tasks.stage import Stage, register


def score_rows(
    items: Sequence[Item],
    gens: Sequence[engines.Generation],
    source,
    *,
    run_id: str,
    round_: int,
    model: str,
    suite: str,
) -> list[dict]:
    """One benchmarks row per item: the task reads the answer and scores it (Task.evaluate)."""
    rows = []
    for it, g in zip(items, gens, strict=True):
        extracted, score = source.evaluate(g.response, it)
        rows.append(
            {
                "run_id": run_id,
                "round": round_,
                "model": model,
                "suite": suite,
                "item_id": it.id,
                "response": g.response,
                "extracted": extracted,
                "score": None if score is None else float(score),
                "n_tokens": g.n_tokens,
            }
        )
    return rows


def summarize(rows: Sequence[dict]) -> dict[str, float | None]:
    """Accuracy (the mean score) and exact match over the items that have a reference answer; None
    when none has (an unscored suite is reported as unscored, never as 0%)."""
    scored = [r["score"] for r in rows if r["score"] is not None]
    exact = sum(exactly_correct(s) for s in scored)
    interval = promote.wilson_interval(exact, len(scored))
    return {
        "accuracy": sum(scored) / len(scored) if scored else None,
        "scored_items": len(scored),
        # exact match (full credit only), beside the mean of the task's partial credit, with its 95% interval
        "exact_match": exact / len(scored) if scored else None,
        "exact_match_low": interval[0] if interval else None,
        "exact_match_high": interval[1] if interval else None,
        "mean_response_tokens": sum(r["n_tokens"] for r in rows) / len(rows),
    }


def guard_suites(cfg, seed: int) -> list[tuple[str, ReasoningGymSource, list[Item]]]:
    """The promotion gate's out-of-domain suites: (name, scorer, items), from benchmark seeds."""
    out = []
    for g in cfg.benchmark.guards:
        source = ReasoningGymSource(g.task, g.options)
        out.append((g.task, source, source.items(seeds.evaluation(seed), g.size)))
    return out


def level_suite(cfg, k: int, split: str) -> str:
    """A curriculum level's split in the benchmarks table: "<task>@<k>-validation", "<task>@<k>-test"."""
    return f"{cfg.task.name}@{k}-{split}"


def suite_names(cfg) -> tuple[str, str]:
    """The (validation, test) suite names in the benchmarks table: "<task>-validation", "<task>-test"."""
    task = cfg.task.name if cfg.task.prompts_file is None else cfg.task.prompts_file.name
    return f"{task}-validation", f"{task}-test"


@task(name="benchmark", cache_policy=NO_CACHE)
def benchmark_task(
    ctx: StageContext, validation: list[Item], test: list[Item], model_ref: str, levels: list[Level] | None = None
) -> dict:
    """The test split (reported: accuracy as the mean score, exact match, mean length), the
    validation split (the promotion gate's: validation_*), every guard suite, every transfer
    suite, and each curriculum level's validation and test splits (`levels`: levels 1..), greedy."""
    cfg = ctx.config
    transfer = transfer_suites(cfg)
    levels = levels or []
    if ctx.round == 0:
        for split, items in (("validation", validation), ("test", test)):
            parquet.write_table(
                ctx.workspace, "prompts", ctx.run_id, 0, prompt_rows(items, ctx.run_id, 0, split), part=split
            )
        for i, (name, _, items) in enumerate(transfer):
            rows = prompt_rows(items, ctx.run_id, 0, f"transfer:{name}")
            parquet.write_table(ctx.workspace, "prompts", ctx.run_id, 0, rows, part=f"transfer-{i}")
        for k, level in enumerate(levels, start=1):
            for split, items in (("validation", level.validation), ("test", level.test)):
                rows = prompt_rows(items, ctx.run_id, 0, f"level-{k}-{split}")
                parquet.write_table(ctx.workspace, "prompts", ctx.run_id, 0, rows, part=f"level-{k}-{split}")
    engine = engines.open_engine(cfg.model, model_ref)
    v_name, t_name = suite_names(cfg)
    source = make_source(cfg.task)
    # the test split's file keeps the name every benchmark table had before splits ("data")
    suites = (
        [(t_name, source, test, "data"), (v_name, source, validation, "validation")]
        + [
            (f"guard:{name}", guard_source, guard_items, f"guard-{i}")
            for i, (name, guard_source, guard_items) in enumerate(guard_suites(cfg, cfg.seed))
        ]
        + [(f"transfer:{name}", src, items, f"transfer-{i}") for i, (name, src, items) in enumerate(transfer)]
    )
    for k, level in enumerate(levels, start=1):
        for split, items in (("validation", level.validation), ("test", level.test)):
            suites.append((level_suite(cfg, k, split), level.source, items, f"level-{k}-{split}"))
    out: dict = {"guard_limits": {g.task: g.max_drop for g in cfg.benchmark.guards}}
    t0 = time.perf_counter()
    for name, suite_source, suite_items, part in suites:
        if not suite_items:  # a prompts file too small for a validation split: the gate reports it unmeasured
            continue
        with progress.stage("benchmark" if part == "data" else name, len(suite_items), "items") as advance:
            gens = engine.greedy(
                [it.prompt for it in suite_items],
                max_new_tokens=cfg.benchmark.max_new_tokens,
                batch_size=cfg.benchmark.batch_size,
                progress=advance,
            )
        rows = score_rows(
            suite_items, gens, suite_source, run_id=ctx.run_id, round_=ctx.round, model=model_ref, suite=name
        )
        parquet.write_table(ctx.workspace, "benchmarks", ctx.run_id, ctx.round, rows, part=part)
        if part == "data":
            seconds = time.perf_counter() - t0
            out |= {
                "benchmark_seconds": seconds,
                "benchmark_tokens_per_s": sampling.tokens_per_second(gens, seconds),
                **summarize(rows),
                "suite": json.dumps({"name": name, "size": len(test)}),
            }
        elif part == "validation":
            out |= {
                f"validation_{k}": v
                for k, v in summarize(rows).items()
                if k in ("accuracy", "exact_match", "exact_match_low", "exact_match_high", "mean_response_tokens")
            }
        elif part.startswith("transfer-"):
            out[f"transfer_exact_match.{name.removeprefix('transfer:')}"] = summarize(rows)["exact_match"]
        elif part.startswith("level-"):
            level_k, split = part.split("-")[1:]
            key = LEVEL_VALIDATION if split == "validation" else "level_exact_match."
            out[f"{key}{level_k}"] = summarize(rows)["exact_match"]
        else:
            out[f"guard_accuracy.{name.removeprefix('guard:')}"] = summarize(rows)["accuracy"]
    if cfg.task.curriculum is not None:  # level 0 is the task's own splits
        out[f"{LEVEL_VALIDATION}0"] = out.get("validation_exact_match")
        out["level_exact_match.0"] = out.get("exact_match")
    if cfg.benchmark.lm_eval is not None:
        from flywheel.models import harness

        t1 = time.perf_counter()
        progress.say(f"[lm_eval] {', '.join(cfg.benchmark.lm_eval.tasks)}")
        metrics, samples = harness.evaluate(cfg.benchmark.lm_eval, model_ref, engine, seed=cfg.seed)
        out |= metrics
        for i, (task_name, rows) in enumerate(sorted(samples.items())):
            rows = [
                dict(r, run_id=ctx.run_id, round=ctx.round, model=model_ref, suite=f"lm_eval:{task_name}") for r in rows
            ]
            if rows:
                parquet.write_table(ctx.workspace, "benchmarks", ctx.run_id, ctx.round, rows, part=f"lm-eval-{i}")
        out["lm_eval_seconds"] = time.perf_counter() - t1
    out["benchmark_seconds_all_suites"] = time.perf_counter() - t0
    catalog.refresh(ctx.workspace)
    return out


register(
    Stage(
        "benchmark",
        50,
        benchmark_task,
        # round 0 benchmarks the starting model with no stage before it
        fingerprint=lambda fp, s: (
            short_hash("benchmark", fp)
            if fp is not None
            else short_hash("benchmark", s.config.hash(), s.round, s.policy)
        ),
        args=lambda ctx, prepared, params, fp: (
            prepared.validation,
            prepared.test,
            params["policy"],
            prepared.levels,
        ),
        params=lambda s: {"policy": s.policy_out or s.policy},
        outputs=(("benchmarks", "*"),),
        baseline=True,
    )
)
