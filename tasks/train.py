"""Stage 4, fine-tuning: DPO on the round's pairs (or SFT on its best samples), from the round's
policy, with a configurable share of earlier rounds' data replayed (SPIN mixes iterations)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import duckdb
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import progress, seeds
from flywheel.models import engines, loading
from flywheel.models.training import trainer
from flywheel.storage import catalog, parquet, tracking
from flywheel.tasks.common import StageContext, short_hash
from flywheel.tasks.stage import RoundState, Stage, register


def checkpoint_dir(ctx: StageContext) -> Path:
    return ctx.workspace / "checkpoints" / f"run_id={ctx.run_id}" / f"round={ctx.round}"


def replay_count(n_current: int, share: float) -> int:
    """How many earlier rows make `share` of a training set that holds `n_current` new ones."""
    return math.floor(share * n_current / (1 - share) + 1e-9) if share > 0 else 0


def training_rows(ctx: StageContext) -> tuple[list[dict], int]:
    """This round's rows plus the replayed ones (a seeded sample of this run's earlier rounds)."""
    table = "sft" if ctx.config.train.method == "sft" else "pairs"
    current = parquet.read_table(ctx.workspace, table, ctx.run_id, ctx.round).to_pylist()
    n = replay_count(len(current), ctx.config.curation.replay)
    earlier = sorted(parquet.partition_dir(ctx.workspace, table, ctx.run_id, 0).parent.glob("round=*/data.parquet"))
    if not n or not earlier:
        return current, 0
    key = "pair_id" if table == "pairs" else "candidate_id"
    files = "[" + ", ".join(catalog.sql_str(str(f)) for f in earlier) + "]"
    relation = duckdb.sql(f"""
        SELECT * FROM read_parquet({files}, hive_partitioning = false) WHERE round < {int(ctx.round)}
        ORDER BY hash({key} || '{int(ctx.config.seed)}:{int(ctx.round)}'), {key} LIMIT {n}""")
    assert relation is not None  # a query: always a relation
    replayed = relation.to_arrow_table()
    return current + replayed.to_pylist(), replayed.num_rows


def cream_label_smoothing(rows: list[dict]) -> float | None:
    """CREAM: trust the round's labels as much as the two rankings agree. The consistency rate
    (1 + τ̄)/2 of the pairs' prompts becomes DPO's label smoothing 1 − (1 + τ̄)/2 (robust/cDPO);
    None when no pair has a τ (round 1: there is no previous ranking)."""
    taus = [r["cream_tau"] for r in rows if r.get("cream_tau") is not None]
    if not taus:
        return None
    return min(0.5, max(0.0, 1 - (1 + sum(taus) / len(taus)) / 2))


@task(name="train", cache_policy=NO_CACHE)
def train_task(ctx: StageContext, policy: str, base: str, fingerprint: str = "") -> dict:
    """`fingerprint` identifies the training's inputs: a rerun with the same one resumes from
    the last checkpoint of a training that was killed."""
    engines.release()  # the sampling / judging model leaves the GPU (and memory) before training takes it
    method = ctx.config.train.method
    rows, n_replay = training_rows(ctx)
    if len(rows) == n_replay:
        # Nothing new to learn from: the round's policy carries over unchanged (and says so).
        return {"train_seconds": 0.0, "policy_out": policy, "trained": False, "train_rows": 0, "replayed_rows": 0}
    out = checkpoint_dir(ctx)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    progress.say(f"[train] {method.upper()} on {len(rows)} rows ({n_replay} replayed) from {policy}")
    train_cfg, extra = ctx.config.train, {}
    smoothing = cream_label_smoothing(rows) if ctx.config.curation.cream == "weight" else None
    if smoothing is not None:
        train_cfg = train_cfg.model_copy(update={"dpo": {**train_cfg.dpo, "label_smoothing": smoothing}})
        extra["dpo_label_smoothing"] = smoothing
    # TRL's training metrics (loss, reward margins) go to the round's run by step; its full config
    # is an artifact, so the run's params stay flywheel's own.
    common: dict[str, Any] = dict(
        base=base,
        seed=seeds.training(ctx.config.seed, ctx.round),
        dtype=ctx.config.model.dtype,
        fingerprint=fingerprint,
        checkpoint_steps=ctx.config.stages.checkpoint_steps,
    )
    if train_cfg.launched():
        # its own job (accelerate launch): this process holds no model while it runs
        metrics = trainer.launch(
            policy,
            rows,
            train_cfg,
            out,
            mlflow_run_id=ctx.mlflow_run_id,
            tracking_uri=tracking.tracking_uri(ctx.workspace),
            **common,
        )
    else:
        callbacks = [tracking.training_callback(ctx.mlflow_run_id)] if ctx.mlflow_run_id is not None else []
        metrics = trainer.train(policy, rows, train_cfg, out, callbacks=callbacks, **common)
    if ctx.mlflow_run_id is not None:
        tracking.log_params(
            ctx.mlflow_run_id,
            {
                "train.world_size": metrics["train_world_size"],
                "train.reference": metrics.get("train_reference", "none"),
            },
        )
    return {
        "train_seconds": time.perf_counter() - t0,
        "policy_out": str(out),
        "trained": True,
        "train_rows": len(rows),
        "replayed_rows": n_replay,
        "weights_sha256": loading.weights_hash(str(out)),
        **extra,
        **metrics,
    }


def _absorb(state: RoundState, result: dict) -> None:
    """The round's model; an untrained round's model is the one it started from, hashed here."""
    trained = dict(result)
    state.policy_out = trained.pop("policy_out")
    if not trained.get("weights_sha256"):
        trained["weights_sha256"] = loading.weights_hash(state.policy_out)
    state.metrics |= trained


register(
    Stage(
        "train",
        40,
        train_task,
        fingerprint=lambda fp, s: short_hash("train", fp, s.base),
        args=lambda ctx, prepared, params, fp: (params["policy"], params["base"], fp),
        params=lambda s: {"policy": s.policy, "base": s.base},
        absorb=_absorb,
    )
)
