"""Stage 2, self-evaluation: every candidate gets the verifier's score (where the task has
one) and the policy's own LLM-as-a-judge score. Unparsed judge outputs stay as rows with
score NULL."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import progress
from flywheel.models import judges, loading
from flywheel.models.tasksource import make_source
from flywheel.storage import catalog, parquet
from flywheel.tasks.common import StageContext, short_hash

VERIFIER_THRESHOLD = 1.0  # a verifier score counts as "correct" at this value
JUDGE_THRESHOLD = 2.5  # an expected judge score (0–5) at or above this counts as "good"


def verifier_rows(prompts: dict[str, dict], candidates: Sequence[dict], source, spec_hash: str) -> list[dict]:
    rows = []
    for c in candidates:
        p = prompts[c["prompt_id"]]
        extracted = judges.extract_answer(c["response"], p["answer"])
        score = source.score(extracted, p["answer"], json.loads(p["metadata"] or "{}"))
        rows.append(dict(run_id=c["run_id"], round=c["round"], candidate_id=c["candidate_id"],
                         prompt_id=c["prompt_id"], source="verifier", spec_hash=spec_hash, score=score,
                         parse_ok=score is not None, raw=extracted, details=None))
    return rows


def judge_metrics(rows: Sequence[dict]) -> dict[str, float | None]:
    """Parse-failure rate of the LLM judge and its agreement with the verifier (where both scored)."""
    by_source: dict[str, dict[str, float | None]] = {}
    for r in rows:
        by_source.setdefault(r["source"], {})[r["candidate_id"]] = r["score"]
    judge = by_source.get("llm_judge", {})
    verifier = by_source.get("verifier", {})
    both = [(judge[c], verifier[c]) for c in judge if judge[c] is not None and verifier.get(c) is not None]
    out: dict[str, float | None] = {
        "judge_parse_failure_rate": (sum(v is None for v in judge.values()) / len(judge)) if judge else None,
        "judge_verifier_agreement": (sum((j >= JUDGE_THRESHOLD) == (v >= VERIFIER_THRESHOLD) for j, v in both)
                                     / len(both)) if both else None,
        "verifier_mean_score": (sum(v for v in verifier.values() if v is not None) / len(verifier))
        if verifier else None,
    }
    return out


@task(name="judge", cache_policy=NO_CACHE)
def judge_task(ctx: StageContext, policy: str) -> dict:
    cfg = ctx.config
    prompts = {p["prompt_id"]: p for p in
               parquet.read_table(ctx.workspace, "prompts", ctx.run_id, ctx.round, part="train").to_pylist()}
    candidates = parquet.read_table(ctx.workspace, "candidates", ctx.run_id, ctx.round).to_pylist()
    rows: list[dict] = []
    t0 = time.perf_counter()
    if cfg.judge.verifier:
        source = make_source(cfg.task)
        rows += verifier_rows(prompts, candidates, source, short_hash("verifier", cfg.task.model_dump(mode="json")))
    template_hash = None
    if cfg.judge.llm_judge:
        rubric = judges.load_rubric(cfg.judge.template)
        template_hash = rubric.hash
        model, tok = loading.load(policy, cfg.model.dtype)
        with progress.stage("judge", len(candidates), "candidates") as advance:
            results = judges.llm_judge(model, tok, rubric, [prompts[c["prompt_id"]]["prompt"] for c in candidates],
                                       [c["response"] for c in candidates], batch_size=cfg.judge.batch_size,
                                       max_prompt_tokens=cfg.judge.max_prompt_tokens, progress=advance)
        rows += [dict(run_id=ctx.run_id, round=ctx.round, candidate_id=c["candidate_id"], prompt_id=c["prompt_id"],
                      source="llm_judge", spec_hash=rubric.hash, score=r.score, parse_ok=r.parse_ok, raw=r.raw,
                      details=r.details) for c, r in zip(candidates, results, strict=True)]
    parquet.write_table(ctx.workspace, "judgments", ctx.run_id, ctx.round, rows)
    catalog.refresh(ctx.workspace)
    return {"judge_seconds": time.perf_counter() - t0, "judge_template_hash": template_hash, **judge_metrics(rows)}


def candidates_sample(ctx: StageContext, limit: int = 64) -> pa.Table:
    """Candidates with their scores, for an MLflow table artifact."""
    root = ctx.workspace
    c, j, p = (catalog.sql_str(str(parquet.table_path(root, t, ctx.run_id, ctx.round, part))) for t, part in
               (("candidates", "data"), ("judgments", "data"), ("prompts", "train")))
    import duckdb

    return duckdb.sql(f"""
        SELECT p.prompt, c.response, c.n_tokens,
               max(j.score) FILTER (WHERE j.source = 'verifier') AS verifier_score,
               max(j.score) FILTER (WHERE j.source = 'llm_judge') AS judge_score
        FROM read_parquet({c}) c JOIN read_parquet({p}) p USING (prompt_id)
        LEFT JOIN read_parquet({j}) j USING (candidate_id)
        GROUP BY ALL ORDER BY p.prompt, c.response LIMIT {int(limit)}""").to_arrow_table()
