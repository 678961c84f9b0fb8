"""Stage 1, self-generation: N samples per prompt from the round's policy."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import progress, seeds
from flywheel.models import engines, shards
from flywheel.models.hf import sampling
from flywheel.models.tasks import Item
from flywheel.models.tasks.decontam import Overlap
from flywheel.models.tasks.splits import train_items
from flywheel.storage import catalog, datacard, parquet
from flywheel.tasks.common import StageContext, short_hash
from flywheel.tasks.stage import Stage, register


def prompt_rows(items: Sequence[Item], run_id: str, round_: int, split: str) -> list[dict]:
    return [
        dict(
            run_id=run_id,
            round=round_,
            prompt_id=it.id,
            split=split,
            task=it.task,
            category=it.category or it.task,
            seed=it.seed,
            prompt=it.prompt,
            answer=it.answer,
            metadata=json.dumps(it.metadata),
        )
        for it in items
    ]


def candidate_rows(
    prompts: Sequence[dict],
    gens: Sequence[engines.Generation],
    *,
    n: int,
    run_id: str,
    round_: int,
    policy: str,
    seed: int,
    sampling_json: str,
) -> list[dict]:
    """`gens` holds n consecutive generations per prompt, in prompt order."""
    if len(gens) != n * len(prompts):
        raise ValueError(f"expected {n * len(prompts)} generations, got {len(gens)}")
    if len({p["prompt_id"] for p in prompts}) != len(prompts):
        raise ValueError("duplicate prompts in one round: candidate ids would collide")
    rows = []
    for i, g in enumerate(gens):
        p, k = prompts[i // n], i % n
        rows.append(
            dict(
                run_id=run_id,
                round=round_,
                candidate_id=short_hash(run_id, round_, p["prompt_id"], k),
                prompt_id=p["prompt_id"],
                policy=policy,
                sample_index=k,
                seed=seeds.row(seed, p["prompt"], k),
                response=g.response,
                n_tokens=g.n_tokens,
                finish_reason=g.finish_reason,
                mean_logprob=g.mean_logprob,
                self_certainty=g.self_certainty,
                sampling=sampling_json,
            )
        )
    return rows


DRAW = "draw.json"  # beside the data card: what the round's draw skipped and why


def removed_items(removed: Sequence[tuple[Item, Overlap]], held: Sequence[Item]) -> list[Item]:
    """The dropped prompts, each with its overlap in its metadata: the rule that fired, the share,
    and the evaluation item it overlaps (its prompt id)."""
    return [
        replace(
            it,
            metadata={
                **it.metadata,
                "overlap": {
                    "rule": o.rule,
                    "share": round(o.share, 4),
                    "item": held[o.item].id if o.item is not None else None,
                },
            },
        )
        for it, o in removed
    ]


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(
    ctx: StageContext,
    items: list[Item],
    policy: str,
    removed: list[tuple[Item, Overlap]] | None = None,
    repeats: int = 0,
    held: list[Item] | None = None,
) -> dict:
    """`removed`: prompts drawn for this round but dropped as overlapping an evaluation item (`held`:
    validation + test), kept (split "decontaminated", their overlap in their metadata) so that they
    can be listed; `repeats`: drawn prompts skipped because an earlier round trained on them."""
    cfg, s = ctx.config, ctx.config.sampling
    prompts = prompt_rows(items, ctx.run_id, ctx.round, "train")
    parquet.write_table(ctx.workspace, "prompts", ctx.run_id, ctx.round, prompts, part="train")
    removed = removed or []
    if removed:
        parquet.write_table(
            ctx.workspace,
            "prompts",
            ctx.run_id,
            ctx.round,
            prompt_rows(removed_items(removed, held or []), ctx.run_id, ctx.round, "decontaminated"),
            part="decontaminated",
        )
    by_rule = {rule: sum(o.rule == rule for _, o in removed) for rule in ("exact", "normalised", "ngram")}
    out = datacard.card_dir(ctx.workspace, ctx.run_id, ctx.round)
    out.mkdir(parents=True, exist_ok=True)
    (out / DRAW).write_text(
        json.dumps(
            {
                "prompts": len(items),
                "removed": by_rule,
                "repeats_skipped": repeats,
                "evaluation_items": len(held or []),
            },
            indent=1,
        )
    )
    seed = seeds.stage(cfg.seed, ctx.round)
    t0 = time.perf_counter()
    with progress.stage("generate", len(items) * s.n, "samples") as advance:
        # sampling.shards streams, over model.workers processes (one: this one)
        gens = shards.sample(
            cfg.model,
            policy,
            [p["prompt"] for p in prompts],
            shards=s.shards,
            workers=cfg.model.workers,
            n=s.n,
            max_new_tokens=s.max_new_tokens,
            batch_size=s.batch_size,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=seed,
            progress=advance,
        )
    seconds = time.perf_counter() - t0
    described = f"{cfg.model.engine}:{policy}" + (f" ({cfg.model.workers} workers)" if cfg.model.workers > 1 else "")
    sampling_json = json.dumps(s.model_dump() | {"seed": seed}, sort_keys=True)
    rows = candidate_rows(
        prompts, gens, n=s.n, run_id=ctx.run_id, round_=ctx.round, policy=policy, seed=seed, sampling_json=sampling_json
    )
    parquet.write_table(ctx.workspace, "candidates", ctx.run_id, ctx.round, rows)
    catalog.refresh(ctx.workspace)
    return {
        "generate_seconds": seconds,
        "generate_engine": described,
        "repeated_prompts_skipped": repeats,
        **{f"decontaminated_{rule}": n for rule, n in by_rule.items()},
        "generate_tokens_per_s": sampling.tokens_per_second(gens, seconds),
        "candidates": len(rows),
        "candidate_mean_tokens": sum(g.n_tokens for g in gens) / len(gens),
    }


def _generate_args(ctx: StageContext, prepared, params: dict, fingerprint: str) -> tuple:
    """The round's fresh training prompts, drawn again from the config (the same draw anywhere)."""
    cfg = ctx.config
    draw = train_items(prepared.source, ctx.round, cfg.task.prompts_per_round, cfg.seed, prepared.decontaminator())
    return draw.items, params["policy"], draw.removed, draw.repeats, prepared.held()


register(
    Stage(
        "generate",
        10,
        generate_task,
        fingerprint=lambda fp, s: short_hash("generate", s.config.hash(), s.round, s.policy),
        args=_generate_args,
        params=lambda s: {"policy": s.policy},
        outputs=(("prompts", "train"), ("prompts", "decontaminated"), ("candidates", "*")),
    )
)
