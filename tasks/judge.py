"""Stage 2, self-evaluation: every configured reward source scores every candidate (one
judgments row per candidate and source; an unparsed verdict stays as a row with score NULL),
and the judge's health is measured for the round (the judge_health table and MLflow)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from itertools import combinations

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import progress, seeds
from flywheel.models import rewards
from flywheel.models.tasks import exactly_correct
from flywheel.models.tasks.splits import make_source
from flywheel.storage import catalog, parquet, plots
from flywheel.storage.datacard import card_dir
from flywheel.tasks.common import StageContext, short_hash
from flywheel.tasks.stage import RoundState, Stage, register


def judgment_rows(
    ctx: StageContext, source: rewards.Source, candidates: Sequence[dict], verdicts: Sequence[rewards.Verdict]
) -> list[dict]:
    return [
        {
            "run_id": ctx.run_id,
            "round": ctx.round,
            "candidate_id": c["candidate_id"],
            "prompt_id": c["prompt_id"],
            "source": source.name,
            "spec_hash": source.spec_hash,
            "score": v.score,
            "parse_ok": v.parse_ok,
            "raw": v.raw,
            "details": json.dumps(v.details) if v.details else None,
        }
        for c, v in zip(candidates, verdicts, strict=True)
    ]


def subset(cfg, sources: Sequence) -> str:
    """judge.subset, with auto resolved: contested when every source curation decides on is a cheap
    decider (its pairs cannot change), all otherwise."""
    if cfg.judge.subset != "auto":
        return cfg.judge.subset
    cheap = {s.name for s in sources if s.cheap_decider}
    return "contested" if cfg.curation.deciding_sources() <= cheap else "all"


def contested(candidates: Sequence[dict], cheap_rows: Sequence[dict]) -> list[dict]:
    """Candidates of prompts that some cheap decider (verifier, majority vote) does not score all
    alike: elsewhere no pair can form on those sources' verdicts. With no decider, all of them."""
    if not cheap_rows:
        return list(candidates)
    spread: dict[tuple[str, str], set] = {}
    for r in cheap_rows:
        spread.setdefault((r["source"], r["prompt_id"]), set()).add(r["score"])
    keep = {pid for (_, pid), scores in spread.items() if len(scores - {None}) > 1}
    return [c for c in candidates if c["prompt_id"] in keep]


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    if sx == 0 or sy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy)


def health(
    rows: Sequence[dict], candidates: Sequence[dict], prompts: dict[str, dict], types: dict[str, str]
) -> list[dict]:
    """Per source: parse failures, score–length correlation, the figures its type registers (an LLM
    judge's sample variance, a pairwise judge's position bias…), and, where a verifier scored the
    same candidates, agreement with it (pointwise, at the threshold its type registers, against
    the verifier's "exactly correct"; and pairwise, on candidate pairs the verifier orders)."""
    tokens = {c["candidate_id"]: c["n_tokens"] for c in candidates}
    by_source: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_source.setdefault(r["source"], {})[r["candidate_id"]] = r
    verifier = next((s for s, t in types.items() if t == "verifier" and s in by_source), None)
    truth = {
        cid: r["score"]
        for cid, r in (by_source.get(verifier, {}) if verifier is not None else {}).items()
        if r["score"] is not None
    }
    out: list[dict] = []

    def put(source: str, metric: str, value: float | None) -> None:
        out.append({"source": source, "metric": metric, "value": None if value is None else float(value)})

    for source, judged in by_source.items():
        kind = types.get(source.split("@")[0], source)
        scored = {cid: r["score"] for cid, r in judged.items() if r["score"] is not None}
        put(source, "judged", len(judged))
        put(source, "parse_failure_rate", sum(not r["parse_ok"] for r in judged.values()) / len(judged))
        put(source, "mean_score", sum(scored.values()) / len(scored) if scored else None)
        put(source, "length_correlation", _pearson([scored[c] for c in scored], [tokens[c] for c in scored]))
        entry = rewards.get(kind)
        if entry is not None and entry.health is not None:
            for metric, value in entry.health(list(judged.values()), prompts).items():
                put(source, metric, value)
        if source == verifier or not truth:
            continue
        both = [c for c in scored if c in truth]
        if entry is not None and entry.threshold is not None and both:
            agree = [(scored[c] >= entry.threshold) == exactly_correct(truth[c]) for c in both]
            put(source, "verifier_agreement", sum(agree) / len(agree))
        by_prompt: dict[str, list[str]] = {}
        for c in candidates:
            if c["candidate_id"] in both:
                by_prompt.setdefault(c["prompt_id"], []).append(c["candidate_id"])
        hits = total = 0.0
        for cids in by_prompt.values():
            for a, b in combinations(cids, 2):
                if truth[a] == truth[b]:
                    continue
                total += 1
                s = (scored[a] - scored[b]) * (truth[a] - truth[b])
                hits += 1.0 if s > 0 else 0.5 if s == 0 else 0.0
        put(source, "verifier_pairwise_accuracy", hits / total if total else None)
    return out


def headline(health_rows: Sequence[dict], types: dict[str, str]) -> dict[str, float | None]:
    """The first LLM judge's numbers under the names the round table and plots use."""
    judge = next((s for s, t in types.items() if t == "llm_judge"), None)
    get = {(h["source"], h["metric"]): h["value"] for h in health_rows}
    verifier = next((s for s, t in types.items() if t == "verifier"), None)
    return {
        "judge_parse_failure_rate": get.get((judge, "parse_failure_rate")),
        "judge_verifier_agreement": get.get((judge, "verifier_agreement")),
        "verifier_mean_score": get.get((verifier, "mean_score")),
    }


@task(name="judge", cache_policy=NO_CACHE)
def judge_task(ctx: StageContext, policy: str, previous: str | None = None, reference: str | None = None) -> dict:
    """`previous`: the previous round's policy (for judges with previous: true); `reference`: the
    DPO reference `policy` was trained against (for the implicit reward)."""
    cfg = ctx.config
    prompts = {
        p["prompt_id"]: p
        for p in parquet.read_table(ctx.workspace, "prompts", ctx.run_id, ctx.round, part="train").to_pylist()
    }
    candidates = parquet.read_table(ctx.workspace, "candidates", ctx.run_id, ctx.round).to_pylist()
    sources = rewards.build(cfg.judge, make_source(cfg.task))
    models = rewards.Models(
        policy,
        previous,
        reference,
        cfg.model.dtype,
        cfg.judge.batch_size,
        cfg.judge.max_prompt_tokens,
        seeds.stage(cfg.seed, ctx.round),
        cfg.model,
    )
    rows: list[dict] = []
    metrics: dict = {}
    t_all = time.perf_counter()
    which = subset(cfg, sources)
    cheap = {s.name for s in sources if s.cheap_decider}
    for source in sources:
        cands = candidates
        if source.model_based and which == "contested":
            cands = contested(candidates, [r for r in rows if r["source"] in cheap])
            metrics[f"judge_skipped.{source.name}"] = len(candidates) - len(cands)
        t0 = time.perf_counter()
        batch = rewards.Batch(prompts, cands)
        total, unit = source.work(batch, models.seed)
        with progress.stage(f"judge:{source.name}", max(total, 1), unit) as advance:
            verdicts = source.judge(batch, models, advance)
        rows += judgment_rows(ctx, source, cands, verdicts)
        seconds = time.perf_counter() - t0
        metrics[f"judge_seconds.{source.name}"] = seconds
        metrics[f"judge_rate.{source.name}"] = len(cands) / seconds if seconds > 0 else None
    parquet.write_table(ctx.workspace, "judgments", ctx.run_id, ctx.round, rows)
    types = {s.spec.key(): s.spec.type for s in sources}
    judged_by = {s.name: s for s in sources}
    # health describes the policy's own samples: a hint's (sampling.hint) were written with the answer in view
    own = {c["candidate_id"] for c in candidates if not json.loads(c["sampling"] or "{}").get("hinted")}
    health_rows = [
        dict(
            run_id=ctx.run_id,
            round=ctx.round,
            **h,
            model=judged_by[h["source"]].judged_by,
            method=judged_by[h["source"]].method,
        )
        for h in health(
            [r for r in rows if r["candidate_id"] in own],
            [c for c in candidates if c["candidate_id"] in own],
            prompts,
            types,
        )
    ]
    parquet.write_table(ctx.workspace, "judge_health", ctx.run_id, ctx.round, health_rows)
    plots.score_histograms(rows, card_dir(ctx.workspace, ctx.run_id, ctx.round) / "judge_scores.png")
    catalog.refresh(ctx.workspace)
    metrics |= {f"judge.{h['source'].replace('@', '_at_')}.{h['metric']}": h["value"] for h in health_rows}
    llm = next((s for s in sources if isinstance(s, rewards.LLMJudge)), None)
    return {
        "judge_seconds": time.perf_counter() - t_all,
        "judge_subset": which,
        "judge_template_hash": llm.rubric.hash if llm else None,
        "judge_models": {s.name: s.judged_by for s in sources if s.judged_by},
        **headline(health_rows, types),
        **metrics,
    }


def candidates_sample(ctx: StageContext, limit: int = 64) -> pa.Table:
    """Candidates with every source's score, for an MLflow table artifact."""
    root = ctx.workspace
    c, j, p = (
        catalog.sql_str(str(parquet.table_path(root, t, ctx.run_id, ctx.round, part)))
        for t, part in (("candidates", "data"), ("judgments", "data"), ("prompts", "train"))
    )
    import duckdb

    relation = duckdb.sql(f"""
        PIVOT (SELECT p.prompt, c.response, c.n_tokens, j.source, j.score
               FROM read_parquet({c}) c JOIN read_parquet({p}) p USING (prompt_id)
               LEFT JOIN read_parquet({j}) j USING (candidate_id))
        ON source USING max(score) ORDER BY prompt, response LIMIT {int(limit)}""")
    assert relation is not None  # a query: always a relation
    return relation.to_arrow_table()


def _previous(s: RoundState) -> str | None:
    """CREAM's second ranking: the policy the previous round started from, if it differs."""
    return s.previous if s.previous != s.policy else None


register(
    Stage(
        "judge",
        20,
        judge_task,
        fingerprint=lambda fp, s: short_hash("judge", fp, _previous(s), s.reference),
        args=lambda ctx, prepared, params, fp: (params["policy"], params.get("previous"), params.get("reference")),
        params=lambda s: {"policy": s.policy, "previous": _previous(s), "reference": s.reference},
        outputs=(("judgments", "*"), ("judge_health", "*")),
    )
)
