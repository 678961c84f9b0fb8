"""The promotion gate as the round's last stage: the round's model against its champion, item by
item on the same splits, then tasks/promote.py's rules decide whether it becomes the champion."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.storage import parquet
from flywheel.tasks import promote
from flywheel.tasks.benchmark import suite_names
from flywheel.tasks.common import StageContext, short_hash
from flywheel.tasks.stage import Stage, register


def split_rows(root: Path, run_id: str, round_: int) -> list[dict]:
    """A round's benchmark rows on the test split (its "data" file) and the validation split."""
    rows = parquet.read_table(root, "benchmarks", run_id, round_).to_pylist()
    if parquet.exists(root, "benchmarks", run_id, round_, part="validation"):
        rows += parquet.read_table(root, "benchmarks", run_id, round_, part="validation").to_pylist()
    return rows


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(ctx: StageContext, champion: dict, metrics: dict) -> dict:
    """The paired gains against the champion (test: reported; validation: what the gate may decide
    on), each guard against the starting model, and the gate's decision with its reasons."""
    config, root, run_id = ctx.config, ctx.workspace, ctx.run_id
    champ = promote.Champion(**champion)
    now, before = (split_rows(root, run_id, k) for k in (ctx.round, champ.round))
    v_suite, t_suite = suite_names(config)
    gains = promote.paired_gains(now, before, seed=config.seed, suite=t_suite)
    gains |= promote.paired_gains(now, before, seed=config.seed, suite=v_suite, prefix="validation_")
    # each guard suite is its own part file of the round's benchmarks ("guard-<i>")
    now_g, start_g = (parquet.read_parts(root, "benchmarks", run_id, k, "guard-*") for k in (ctx.round, 0))
    for g in config.benchmark.guards:
        gains |= promote.paired_gains(
            now_g, start_g, seed=config.seed, suite=f"guard:{g.task}", prefix=f"guard_change.{g.task}."
        )
    promoted, reasons = promote.decide(metrics | gains, champ, config.promotion, bool(metrics.get("trained")))
    return gains | {"promoted": promoted, "promotion_reasons": reasons}


register(
    Stage(
        "promote",
        60,
        promote_task,
        fingerprint=lambda fp, s: short_hash("promote", fp, s.champion.policy, s.champion.round),
        args=lambda ctx, prepared, params, fp: (params["champion"], params["metrics"]),
        params=lambda s: {"champion": s.champion.__dict__, "metrics": s.metrics},
        placeable=False,
    )
)
