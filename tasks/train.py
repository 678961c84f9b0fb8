"""Stage 4, fine-tuning: DPO on the round's pairs, from the round's policy."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import progress
from flywheel.models import trainer
from flywheel.storage import parquet, tracking
from flywheel.tasks.common import StageContext


def checkpoint_dir(ctx: StageContext) -> Path:
    return ctx.workspace / "checkpoints" / f"run_id={ctx.run_id}" / f"round={ctx.round}"


@task(name="train", cache_policy=NO_CACHE)
def train_task(ctx: StageContext, policy: str, base: str) -> dict:
    pairs = parquet.read_table(ctx.workspace, "pairs", ctx.run_id, ctx.round).to_pylist()
    if not pairs:
        # Nothing to learn from: the round's policy carries over unchanged (and says so).
        return {"train_seconds": 0.0, "policy_out": policy, "trained": False}
    out = checkpoint_dir(ctx)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    progress.console.print(f"[train] DPO on {len(pairs)} pairs from {policy}")
    # TRL's own MLflow callback logs loss and reward margins into the round's run.
    tracked = ctx.mlflow_run_id is not None
    with tracking.active(ctx.mlflow_run_id) if tracked else contextlib.nullcontext():
        metrics = trainer.train_dpo(policy, pairs, ctx.config.train, out, base=base, seed=ctx.config.seed + ctx.round,
                                    report_to=["mlflow"] if tracked else [], dtype=ctx.config.model.dtype)
    return {"train_seconds": time.perf_counter() - t0, "policy_out": str(out), "trained": True, **metrics}
