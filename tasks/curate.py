"""Stage 3, preference-pair curation: a SQL query in DuckDB over the round's Parquet tables.

`max_min`: per prompt, the best-rewarded candidate is chosen and the worst rejected. NULL
rewards never take part, pairs whose margin is below `min_margin` (ties included) are
dropped, and identical texts are never paired. Ties inside the best or worst group are
broken by candidate_id, so the result is deterministic.
"""

from __future__ import annotations

import time

import duckdb
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.config import CurationConfig
from flywheel.storage import catalog, parquet
from flywheel.tasks.common import StageContext

# Per-candidate reward, from the judgments table (one row per candidate and source).
# "verifier+llm_judge": the verifier decides; the judge (0–5, scaled into [0, 0.5)) only orders
# candidates the verifier scored alike, so it can never outweigh a verifier difference.
REWARDS = {
    "verifier": "max(score) FILTER (WHERE source = 'verifier')",
    "llm_judge": "max(score) FILTER (WHERE source = 'llm_judge')",
    "verifier+llm_judge": "max(score) FILTER (WHERE source = 'verifier')"
                          " + 0.099 * max(score) FILTER (WHERE source = 'llm_judge')",
}

MAX_MIN_SQL = """
WITH reward AS (
    SELECT candidate_id, {reward} AS reward
    FROM judgments GROUP BY candidate_id
), scored AS (
    SELECT c.run_id, c.round, c.prompt_id, p.prompt, c.candidate_id, c.response, r.reward
    FROM candidates c
    JOIN (SELECT DISTINCT prompt_id, prompt FROM prompts) p USING (prompt_id)
    JOIN reward r USING (candidate_id)
    WHERE r.reward IS NOT NULL
), ranked AS (
    SELECT *,
           row_number() OVER (PARTITION BY prompt_id ORDER BY reward DESC, candidate_id) AS best,
           row_number() OVER (PARTITION BY prompt_id ORDER BY reward ASC, candidate_id) AS worst
    FROM scored
)
SELECT b.run_id, b.round, sha256(b.candidate_id || ':' || w.candidate_id)[1:16] AS pair_id,
       b.prompt_id, b.prompt, b.response AS chosen, w.response AS rejected,
       b.reward AS chosen_score, w.reward AS rejected_score, b.reward - w.reward AS margin,
       'max_min' AS rule, $reward_name AS reward, b.candidate_id AS chosen_id, w.candidate_id AS rejected_id
FROM ranked b JOIN ranked w ON b.prompt_id = w.prompt_id AND b.best = 1 AND w.worst = 1
WHERE b.reward - w.reward >= $min_margin AND b.response <> w.response
ORDER BY b.prompt_id
"""


def curate(con: duckdb.DuckDBPyConnection, cfg: CurationConfig) -> pa.Table:
    """Pairs from the relations `prompts`, `candidates`, `judgments` visible on `con`."""
    sql = MAX_MIN_SQL.format(reward=REWARDS[cfg.reward])
    tbl = con.sql(sql, params={"min_margin": cfg.min_margin, "reward_name": cfg.reward}).to_arrow_table()
    return tbl.cast(parquet.TABLES["pairs"])


def pair_metrics(pairs: pa.Table, n_prompts: int) -> dict[str, float]:
    margins = pairs.column("margin").to_pylist()
    return {"pairs": len(margins), "mean_margin": sum(margins) / len(margins) if margins else 0.0,
            "prompts_with_pair": len(margins) / n_prompts if n_prompts else 0.0}


@task(name="curate", cache_policy=NO_CACHE)
def curate_task(ctx: StageContext) -> dict:
    t0 = time.perf_counter()
    root = ctx.workspace
    with duckdb.connect() as con:
        for table, part in (("prompts", "train"), ("candidates", "data"), ("judgments", "data")):
            path = parquet.table_path(root, table, ctx.run_id, ctx.round, part)
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({catalog.sql_str(str(path))})")
        pairs = curate(con, ctx.config.curation)
        n_prompts = con.execute("SELECT count(DISTINCT prompt_id) FROM prompts").fetchone()[0]
    parquet.write_table(root, "pairs", ctx.run_id, ctx.round, pairs)
    catalog.refresh(root)
    return {"curate_seconds": time.perf_counter() - t0, **pair_metrics(pairs, n_prompts)}
