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
from flywheel.models.tasks import Item, exactly_correct
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
    first: int = 0,
) -> list[dict]:
    """`gens` holds n consecutive generations per prompt, in prompt order, drawn with `seed`; their
    sample indices start at `first` (a frontier's top-up pass: after the probe's)."""
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
                candidate_id=short_hash(run_id, round_, p["prompt_id"], first + k),
                prompt_id=p["prompt_id"],
                policy=policy,
                sample_index=first + k,
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


def top_up(right: Sequence[Sequence[bool]], *, spare: int, more: int) -> list[int]:
    """The prompts (indices) a frontier's second pass samples `more` times each, within `spare`
    samples: first those whose probe samples were all right (a wrong one would make a pair), then
    those all wrong (a right one would), then the contested ones (they have a pair already); in
    draw order within each."""

    def rank(i: int) -> int:
        hits = sum(right[i])
        return 0 if hits == len(right[i]) else 1 if hits == 0 else 2

    order = sorted(range(len(right)), key=lambda i: (rank(i), i))
    return sorted(order[: spare // more]) if more > 0 else []


def hint_targets(items: Sequence[Item], right: Sequence[Sequence[bool]], n: int) -> list[int]:
    """The prompts (indices) sampling.hint samples again: those with a reference answer whose n samples
    were all wrong (a frontier's prompts that were probed but not topped up have fewer: not these)."""
    return [i for i, it in enumerate(items) if it.answer not in (None, "") and len(right[i]) == n and not any(right[i])]


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
    level: int | None = None,
    source=None,
) -> dict:
    """`removed`: prompts drawn for this round but dropped as overlapping an evaluation item (`held`:
    every evaluation item), kept (split "decontaminated", their overlap in their metadata) so that they
    can be listed; `repeats`: drawn prompts skipped because an earlier round trained on them;
    `level`: the curriculum level the items were drawn at (None: no curriculum); `source`: the task
    source they were drawn from (a frontier scores its probe with it, a hint the samples)."""
    cfg, s = ctx.config, ctx.config.sampling
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

    def draw(texts: list[str], n: int, seed: int, label: str) -> list[engines.Generation]:
        with progress.stage(label, len(texts) * n, "samples") as advance:
            # sampling.shards streams, over model.workers processes (one: this one)
            return shards.sample(
                cfg.model,
                policy,
                texts,
                shards=s.shards,
                workers=cfg.model.workers,
                n=n,
                max_new_tokens=s.max_new_tokens,
                batch_size=s.batch_size,
                temperature=s.temperature,
                top_p=s.top_p,
                seed=seed,
                progress=advance,
            )

    def rows_of(
        prompts: list[dict], gens: list[engines.Generation], n: int, seed: int, first: int = 0, hinted: bool = False
    ) -> list[dict]:
        marks = {"seed": seed} | ({"hinted": True} if hinted else {})
        sampling_json = json.dumps(s.model_dump() | marks, sort_keys=True)
        return candidate_rows(
            prompts,
            gens,
            n=n,
            run_id=ctx.run_id,
            round_=ctx.round,
            policy=policy,
            seed=seed,
            sampling_json=sampling_json,
            first=first,
        )

    def verdicts(gens: list[engines.Generation], its: list[Item], n: int) -> list[list[bool]]:
        """The verifier's verdict on each item's n consecutive generations."""
        return [[_right(source, g, it) for g in gens[i * n : (i + 1) * n]] for i, it in enumerate(its)]

    t0 = time.perf_counter()
    fr, extra = s.frontier, {}
    prompts = prompt_rows(items, ctx.run_id, ctx.round, "train")
    meta: list[dict] = [{} for _ in items]  # what a pass adds to a prompt's metadata
    right: list[list[bool]] = []  # the verifier's verdict on each prompt's samples (a frontier or a hint)
    if fr is None:
        gens = draw([p["prompt"] for p in prompts], s.n, seed, "generate")
        rows = rows_of(prompts, gens, s.n, seed)
        if s.hint is not None:
            assert source is not None  # _generate_args passes the items' source
            right = verdicts(gens, items, s.n)
    else:
        # pass 1: `probe` samples of every pooled prompt; pass 2: the spare budget, n - probe more for
        # the prompts where a pair can still form (top_up), with a seed of its own
        assert source is not None  # _generate_args passes the items' source
        probe = draw([p["prompt"] for p in prompts], fr.probe, seed, "generate (probe)")
        rows = rows_of(prompts, probe, fr.probe, seed)
        right = verdicts(probe, items, fr.probe)
        spare = s.budget(cfg.task.prompts_per_round) - len(probe)
        chosen = top_up(right, spare=spare, more=s.n - fr.probe)
        more_seed = seeds.top_up(seed)
        texts = [prompts[i]["prompt"] for i in chosen]
        more = draw(texts, s.n - fr.probe, more_seed, "generate (top-up)") if texts else []
        rows += rows_of([prompts[i] for i in chosen], more, s.n - fr.probe, more_seed, first=fr.probe)
        for i, later in zip(chosen, verdicts(more, [items[i] for i in chosen], s.n - fr.probe), strict=True):
            right[i] += later
        gens = probe + more
        for i in range(len(items)):
            meta[i]["frontier"] = _pass_rates(right[i], fr.probe)
        contested = [0 < sum(r[: fr.probe]) < fr.probe for r in right]
        extra = {
            "frontier_probe_contested": sum(contested),
            "frontier_probe_all_right": sum(all(r[: fr.probe]) for r in right),
            "frontier_topped_up": len(chosen),
            "frontier_contested": sum(0 < sum(r) < len(r) for r in right),
        }
    own = gens  # the policy's own samples, without a hint's
    if s.hint is not None:
        # STaR's rationalization: the prompts with no right sample, sampled again with their answer
        # given; indices from sampling.n on (no prompt has more samples than n), a seed of their own
        k, hint_seed = s.hint.samples, seeds.hint(seed)
        wrong = hint_targets(items, right, s.n)
        targets = [items[i] for i in wrong]
        texts = [s.hint.template.format(prompt=it.prompt, answer=it.answer) for it in targets]
        hinted = draw(texts, k, hint_seed, "generate (hint)") if texts else []
        asked = [{"prompt_id": prompts[i]["prompt_id"], "prompt": t} for i, t in zip(wrong, texts, strict=True)]
        # a sample that states its answer without the steps to it is dropped (sampling.hint.require_work)
        keep = [not s.hint.require_work or source.shows_work(g.response, targets[j // k]) for j, g in enumerate(hinted)]
        hinted_rows = rows_of(asked, hinted, k, hint_seed, first=s.n, hinted=True)
        rows += [r for r, kept in zip(hinted_rows, keep, strict=True) if kept]
        marked = verdicts(hinted, targets, k)
        hits = [sum(v and keep[j * k + x] for x, v in enumerate(vs)) for j, vs in enumerate(marked)]
        for j, i in enumerate(wrong):
            meta[i]["hint"] = {"samples": k, "kept": sum(keep[j * k : (j + 1) * k]), "right": hits[j]}
        gens = gens + hinted  # every sample drawn, dropped ones too: the round's throughput
        extra |= {
            "hint_prompts": len(wrong),
            "hint_prompts_right": sum(h > 0 for h in hits),
            "hint_samples": sum(keep),
            "hint_samples_answer_only": len(hinted) - sum(keep),
        }
    if fr is not None or s.hint is not None:
        position = {p["prompt_id"]: i for i, p in enumerate(prompts)}
        rows.sort(key=lambda r: (position[r["prompt_id"]], r["sample_index"]))
        prompts = prompt_rows(
            [replace(it, metadata={**it.metadata, **m}) if m else it for it, m in zip(items, meta, strict=True)],
            ctx.run_id,
            ctx.round,
            "train",
        )
    seconds = time.perf_counter() - t0
    parquet.write_table(ctx.workspace, "prompts", ctx.run_id, ctx.round, prompts, part="train")
    described = f"{cfg.model.engine}:{policy}" + (f" ({cfg.model.workers} workers)" if cfg.model.workers > 1 else "")
    parquet.write_table(ctx.workspace, "candidates", ctx.run_id, ctx.round, rows)
    catalog.refresh(ctx.workspace)
    if level is not None:
        extra["curriculum_level"] = level
    return extra | {
        "generate_seconds": seconds,
        "generate_engine": described,
        "repeated_prompts_skipped": repeats,
        **{f"decontaminated_{rule}": n for rule, n in by_rule.items()},
        "generate_tokens_per_s": sampling.tokens_per_second(gens, seconds),
        "candidates": len(rows),
        "candidate_mean_tokens": sum(g.n_tokens for g in own) / len(own),
    }


def _right(source, g: engines.Generation, item: Item) -> bool:
    return exactly_correct(source.evaluate(g.response, item)[1])


def _pass_rates(right: list[bool], probe: int) -> dict:
    """A frontier prompt's record (prompts.metadata "frontier"): its probe's pass rate and its own over
    all its samples."""
    return {
        "probe_samples": probe,
        "probe_pass_rate": sum(right[:probe]) / probe,
        "samples": len(right),
        "pass_rate": sum(right) / len(right),
    }


def _generate_args(ctx: StageContext, prepared, params: dict, fingerprint: str) -> tuple:
    """The round's fresh training prompts, drawn again from the config (the same draw anywhere)."""
    cfg = ctx.config
    size = cfg.task.prompts_per_round if cfg.sampling.frontier is None else cfg.sampling.frontier.pool
    level, earlier = params.get("level"), params.get("earlier_levels") or []
    source = prepared.source_at(level)
    draw = train_items(
        source,
        ctx.round,
        size,
        cfg.seed,
        prepared.decontaminator(),
        earlier=(lambda r: prepared.source_at(earlier[r - 1] if r - 1 < len(earlier) else None)) if earlier else None,
    )
    return draw.items, params["policy"], draw.removed, draw.repeats, prepared.held(), level, source


def _generate_params(s) -> dict:
    """The policy; with a curriculum, the round's level and the earlier rounds' (which draws they made)."""
    if s.level is None:
        return {"policy": s.policy}
    return {"policy": s.policy, "level": s.level, "earlier_levels": list(s.earlier_levels)}


register(
    Stage(
        "generate",
        10,
        generate_task,
        fingerprint=lambda fp, s: short_hash("generate", s.config.hash(), s.round, *_generate_params(s).values()),
        args=_generate_args,
        params=_generate_params,
        outputs=(("prompts", "train"), ("prompts", "decontaminated"), ("candidates", "*")),
    )
)
