"""Stage 3, preference-pair curation: SQL in DuckDB over the round's Parquet tables.

The rule is a chain of views, one per filter, so that the data card can count what each
filter kept (`funnel`):

  cur_reward   per candidate, the configured reward: one source's score or a weighted sum of
               several (each optionally min-max scaled within its prompt); NULL when any is NULL
  cur_scored   every candidate with a non-NULL reward, minus length_penalty · n_tokens
               (RLHFlow's max_min_p when λ > 0)
  cur_unique   identical responses (after whitespace normalisation) once per prompt (`dedup`)
  cur_signal   prompts whose rewards spread by at least min_margin: a prompt whose samples all
               score the same (all right, all wrong) teaches nothing and is dropped, and counted
  cur_pairs    the rule's candidate pairs, each with its rank within its prompt:
                 max_min    k-th best vs k-th worst
                 max_random best vs a seeded-random candidate at least min_margin below it
                 max_second best vs the strongest candidate at least min_margin below it
  cur_correct  where a verifier exists (and chosen: exact), pairs whose chosen response it marks
               exactly correct: partial credit ranks, but never makes a wrong answer "chosen"
  cur_kept     SCIR's consistency filter: pairs that every `consistency` source orders the same
               way; CREAM: each pair carries its prompt's Kendall τ between this round's and the
               previous round's judge, and with cream: skip, pairs with τ < cream_min_tau go
  cur_capped   at most pairs_per_prompt pairs per prompt
  cur_final    per-category balance: at most as many pairs per category as the smallest
               category has (balance_categories) and at most max_pairs_per_category

Pairs never tie (chosen − rejected ≥ min_margin > 0), NULL rewards never take part, identical
texts are never paired, and every tie inside a ranking is broken by sample index (the earlier
sample first), so the result is deterministic and the same for two runs with the same seed. The SFT set
(STaR / rejection sampling) is each prompt's best unique sample whose reward reaches sft_threshold
(its sft_per_prompt best, ReST-EM).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import duckdb
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import seeds
from flywheel.config import CurationConfig
from flywheel.models.tasks.base import EXACT  # the one definition of "exactly correct"
from flywheel.storage import catalog, datacard, parquet
from flywheel.tasks.common import StageContext, short_hash
from flywheel.tasks.generate import DRAW
from flywheel.tasks.stage import Stage, register

# Per-candidate reward from the judgments table (one row per candidate and source).
_REWARD = """
CREATE OR REPLACE TEMP TABLE cur_reward AS
WITH w(source, weight) AS (VALUES {weights}),
j AS (SELECT j.candidate_id, j.prompt_id, j.source, w.weight, j.score FROM judgments j JOIN w USING (source)),
n AS (SELECT *, {scaled} AS s FROM j WINDOW p AS (PARTITION BY prompt_id, source))
SELECT candidate_id, CASE WHEN count(s) = {n_sources} THEN sum(weight * s) END AS reward
FROM n GROUP BY candidate_id
"""
_MINMAX = """CASE WHEN score IS NULL THEN NULL ELSE coalesce(
    (score - min(score) OVER p) / nullif(max(score) OVER p - min(score) OVER p, 0), 0) END"""

# CREAM: per prompt, Kendall's τ-b between two rankings of the same candidates.
_CREAM = """
CREATE OR REPLACE TEMP TABLE cur_cream AS
WITH x AS (
    SELECT candidate_id, any_value(prompt_id) AS prompt_id,
           max(score) FILTER (WHERE source = {now}) AS s1, max(score) FILTER (WHERE source = {before}) AS s2
    FROM judgments GROUP BY candidate_id HAVING s1 IS NOT NULL AND s2 IS NOT NULL)
SELECT a.prompt_id,
       sum(sign(a.s1 - b.s1) * sign(a.s2 - b.s2))
       / nullif(sqrt(sum(abs(sign(a.s1 - b.s1))) * sum(abs(sign(a.s2 - b.s2)))), 0) AS tau
FROM x a JOIN x b ON a.prompt_id = b.prompt_id AND a.candidate_id < b.candidate_id
GROUP BY a.prompt_id
"""

# The prompt text joins only the final pairs: carried through every candidate row, it would
# multiply the memory of the steps by the samples per prompt. The steps that later steps read
# more than once are temp tables, computed once.
_SCORED = """
CREATE OR REPLACE TEMP VIEW cur_scored AS
SELECT c.run_id, c.round, c.prompt_id, p.category, c.candidate_id, c.sample_index, c.response, c.n_tokens,
       r.reward AS raw_reward, r.reward - {length_penalty} * c.n_tokens AS reward,
       regexp_replace(trim(c.response), '\\s+', ' ', 'g') AS norm
FROM candidates c
JOIN (SELECT prompt_id, any_value(category) AS category FROM prompts GROUP BY prompt_id) p USING (prompt_id)
JOIN cur_reward r USING (candidate_id)
WHERE r.reward IS NOT NULL
"""

_UNIQUE = """
CREATE OR REPLACE TEMP TABLE cur_unique AS
SELECT * FROM cur_scored
{dedup}
"""

_SIGNAL = """
CREATE OR REPLACE TEMP TABLE cur_spread AS
SELECT prompt_id, max(reward) - min(reward) AS spread FROM cur_unique GROUP BY prompt_id;
CREATE OR REPLACE TEMP TABLE cur_signal AS
SELECT u.*,
       row_number() OVER (PARTITION BY prompt_id ORDER BY reward DESC, sample_index, candidate_id) AS best_rank,
       row_number() OVER (PARTITION BY prompt_id ORDER BY reward ASC, sample_index, candidate_id) AS worst_rank
FROM cur_unique u JOIN cur_spread s USING (prompt_id)
WHERE s.spread >= {min_margin}
"""

_PAIR_COLUMNS = """
    b.run_id, b.round, sha256(b.candidate_id || ':' || w.candidate_id)[1:16] AS pair_id,
    b.prompt_id, b.response AS chosen, w.response AS rejected,
    b.reward AS chosen_score, w.reward AS rejected_score, b.reward - w.reward AS margin,
    '{rule}' AS rule, '{reward_name}' AS reward, b.candidate_id AS chosen_id, w.candidate_id AS rejected_id,
    b.category, b.n_tokens AS chosen_tokens, w.n_tokens AS rejected_tokens"""

# Each rule: the candidate pairs of a prompt with their rank (1 = the rule's first choice).
_RULES = {
    "max_min": """
SELECT {columns}, b.best_rank AS pair_rank
FROM cur_signal b JOIN cur_signal w ON b.prompt_id = w.prompt_id AND b.best_rank = w.worst_rank
WHERE b.reward - w.reward >= {min_margin} AND b.norm <> w.norm""",
    "max_random": """
SELECT {columns}, row_number() OVER (PARTITION BY b.prompt_id ORDER BY hash(w.prompt_id || ':' || w.sample_index
                                      || ':{seed}'), w.sample_index, w.candidate_id) AS pair_rank
FROM cur_signal b JOIN cur_signal w ON b.prompt_id = w.prompt_id AND b.best_rank = 1
WHERE b.reward - w.reward >= {min_margin} AND b.norm <> w.norm""",
    "max_second": """
SELECT {columns}, row_number() OVER (PARTITION BY b.prompt_id ORDER BY w.reward DESC, w.sample_index,
                                      w.candidate_id) AS pair_rank
FROM cur_signal b JOIN cur_signal w ON b.prompt_id = w.prompt_id AND b.best_rank = 1
WHERE b.reward - w.reward >= {min_margin} AND b.norm <> w.norm""",
}

_KEEP = """
CREATE OR REPLACE TEMP TABLE cur_correct AS
SELECT * FROM cur_pairs WHERE {chosen_correct};
CREATE OR REPLACE TEMP TABLE cur_consistent AS
SELECT p.* FROM cur_correct p {consistency_joins} WHERE {consistency};
CREATE OR REPLACE TEMP TABLE cur_kept AS
SELECT p.*, c.tau AS cream_tau FROM cur_consistent p LEFT JOIN cur_cream c USING (prompt_id)
WHERE {cream_keep}
"""

_CAP_AND_BALANCE = """
CREATE OR REPLACE TEMP VIEW cur_capped AS
SELECT * EXCLUDE (pair_rank) FROM cur_kept WHERE pair_rank <= {pairs_per_prompt};
CREATE OR REPLACE TEMP TABLE cur_final AS
SELECT * EXCLUDE (cat_rank) FROM (
    SELECT *, row_number() OVER (PARTITION BY category ORDER BY hash(prompt_id || '{seed}'), pair_id) AS cat_rank
    FROM cur_capped)
WHERE cat_rank <= {category_limit}
"""

_PROMPT_TEXT = "SELECT prompt_id, any_value(prompt) AS prompt FROM prompts GROUP BY prompt_id"

_SFT = """
SELECT run_id, round, prompt_id, p.prompt, response AS completion, raw_reward AS score, '{reward_name}' AS reward,
       candidate_id, category, n_tokens
FROM cur_unique JOIN ({prompt_text}) p USING (prompt_id) WHERE raw_reward >= {threshold}
QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY reward DESC, sample_index, candidate_id) <= {per_prompt}
ORDER BY prompt_id
"""

_FUNNEL = """
SELECT
    (SELECT count(*) FROM candidates) AS candidates,
    (SELECT count(*) FROM candidates c JOIN cur_reward r USING (candidate_id)
     WHERE r.reward IS NOT NULL) AS candidates_scored,
    (SELECT count(*) FROM cur_unique) AS candidates_unique,
    (SELECT count(DISTINCT prompt_id) FROM prompts) AS prompts,
    (SELECT count(*) FROM cur_spread) AS prompts_scored,
    (SELECT count(*) FROM cur_spread WHERE spread = 0) AS prompts_uniform,
    (SELECT count(*) FROM cur_spread WHERE spread > 0 AND spread < {min_margin}) AS prompts_below_margin,
    (SELECT count(*) FROM cur_spread WHERE spread >= {min_margin}) AS prompts_with_signal,
    (SELECT count(*) FROM cur_pairs) AS pairs_eligible,
    (SELECT count(*) FROM cur_correct) AS pairs_chosen_correct,
    (SELECT count(*) FROM cur_consistent) AS pairs_consistent,
    (SELECT count(*) FROM cur_kept) AS pairs_cream_kept,
    (SELECT avg(tau) FROM cur_cream) AS cream_tau,
    (SELECT count(*) FROM cur_capped) AS pairs_capped,
    (SELECT count(*) FROM cur_final) AS pairs
"""


def _num(x: float) -> str:
    """A validated number as a SQL literal (DuckDB views cannot hold bound parameters)."""
    return repr(float(x))


@dataclass
class Curated:
    pairs: pa.Table
    sft: pa.Table
    funnel: dict[str, int]  # how many candidates / prompts / pairs each filter kept


def curate(con: duckdb.DuckDBPyConnection, cfg: CurationConfig, seed: int = 0, verifier: str | None = None) -> Curated:
    """Pairs and the SFT set from the relations `prompts`, `candidates`, `judgments` on `con`.
    `verifier`: the name of the verifier source, when there is one (with cfg.chosen "exact", a
    pair's chosen response must have its full credit)."""
    m = _num(cfg.min_margin)
    weights = cfg.weights()
    con.execute(
        _REWARD.format(
            weights=", ".join(f"({catalog.sql_str(n)}, {_num(w)})" for n, w in weights.items()),
            n_sources=len(weights),
            scaled=_MINMAX if cfg.normalize == "prompt_minmax" else "score",
        )
    )
    con.execute(
        _CREAM.format(now=catalog.sql_str(cfg.cream_source), before=catalog.sql_str(f"{cfg.cream_source}@previous"))
    )
    dedup = (
        "QUALIFY row_number() OVER (PARTITION BY prompt_id, norm ORDER BY reward DESC, sample_index, candidate_id) = 1"
        if cfg.dedup
        else ""
    )
    limits = []
    if cfg.balance_categories:
        limits.append("(SELECT min(n) FROM (SELECT count(*) AS n FROM cur_capped GROUP BY category))")
    if cfg.max_pairs_per_category is not None:
        limits.append(str(int(cfg.max_pairs_per_category)))
    category_limit = (
        f"least({', '.join(limits)})" if len(limits) > 1 else (limits[0] if limits else "9223372036854775807")
    )
    columns = _PAIR_COLUMNS.format(rule=cfg.rule, reward_name=cfg.reward_name().replace("'", "''"))
    con.execute(_SCORED.format(length_penalty=_num(cfg.length_penalty)))
    con.execute(_UNIQUE.format(dedup=dedup))
    con.execute(_SIGNAL.format(min_margin=m))
    con.execute(
        "CREATE OR REPLACE TEMP TABLE cur_pairs AS "
        + _RULES[cfg.rule].format(columns=columns, min_margin=m, seed=int(seed))
    )
    joins, conditions = [], ["true"]
    for i, source in enumerate(cfg.consistency):
        name = catalog.sql_str(source)
        for side, cid in (("b", "chosen_id"), ("w", "rejected_id")):
            joins.append(
                f"LEFT JOIN (SELECT candidate_id, score FROM judgments WHERE source = {name}) {side}{i} "
                f"ON {side}{i}.candidate_id = p.{cid}"
            )
        conditions.append(f"coalesce(b{i}.score > w{i}.score, false)")
    cream_keep = f"(c.tau IS NULL OR c.tau >= {_num(cfg.cream_min_tau)})" if cfg.cream == "skip" else "true"
    chosen_correct = "true"
    if verifier is not None and cfg.chosen == "exact":
        chosen_correct = (
            f"chosen_id IN (SELECT candidate_id FROM judgments WHERE source = {catalog.sql_str(verifier)} "
            f"AND score >= {_num(EXACT)})"
        )
    con.execute(
        _KEEP.format(
            consistency_joins=" ".join(joins),
            consistency=" AND ".join(conditions),
            cream_keep=cream_keep,
            chosen_correct=chosen_correct,
        )
    )
    con.execute(
        _CAP_AND_BALANCE.format(
            pairs_per_prompt=int(cfg.pairs_per_prompt), seed=int(seed), category_limit=category_limit
        )
    )
    pairs = con.sql(
        f"SELECT f.*, p.prompt FROM cur_final f JOIN ({_PROMPT_TEXT}) p USING (prompt_id) "
        "ORDER BY prompt_id, chosen_id, rejected_id"
    ).to_arrow_table()
    sft = con.sql(
        _SFT.format(
            reward_name=cfg.reward_name().replace("'", "''"),
            threshold=_num(cfg.sft_threshold),
            per_prompt=int(cfg.sft_per_prompt),
            prompt_text=_PROMPT_TEXT,
        )
    ).to_arrow_table()
    funnel = con.sql(_FUNNEL.format(min_margin=m)).to_arrow_table().to_pylist()[0]
    return Curated(
        pairs.select(parquet.TABLES["pairs"].names).cast(parquet.TABLES["pairs"]),
        sft.cast(parquet.TABLES["sft"]),
        {k: (v if k == "cream_tau" else int(v)) for k, v in funnel.items()},
    )


def pair_metrics(curated: Curated) -> dict[str, float]:
    pairs, f = curated.pairs, curated.funnel
    margins = pairs.column("margin").to_pylist()
    gaps = [
        c - r for c, r in zip(pairs.column("chosen_tokens").to_pylist(), pairs.column("rejected_tokens").to_pylist())
    ]
    return {
        "pairs": len(margins),
        "mean_margin": sum(margins) / len(margins) if margins else 0.0,
        "prompts_with_pair": len({*pairs.column("prompt_id").to_pylist()}) / f["prompts"] if f["prompts"] else 0.0,
        "pair_length_gap": sum(gaps) / len(gaps) if gaps else 0.0,
        "prompts_no_signal": f["prompts_uniform"],
        "duplicates_removed": f["candidates_scored"] - f["candidates_unique"],
        "pairs_inconsistent": f["pairs_eligible"] - f["pairs_consistent"],
        "pairs_cream_skipped": f["pairs_consistent"] - f["pairs_cream_kept"],
        "cream_tau": f["cream_tau"],
        "sft_examples": curated.sft.num_rows,
    }


@task(name="curate", cache_policy=NO_CACHE)
def curate_task(ctx: StageContext) -> dict:
    t0 = time.perf_counter()
    root = ctx.workspace
    verifier = verifier_source(ctx.config)
    with duckdb.connect() as con:
        for table, part in (("prompts", "train"), ("candidates", "data"), ("judgments", "data")):
            path = parquet.table_path(root, table, ctx.run_id, ctx.round, part)
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({catalog.sql_str(str(path))})")
        curated = curate(con, ctx.config.curation, seeds.training(ctx.config.seed, ctx.round), verifier)
        labels = pair_labels(con, curated.pairs, verifier)
    parquet.write_table(root, "pairs", ctx.run_id, ctx.round, curated.pairs)
    parquet.write_table(root, "sft", ctx.run_id, ctx.round, curated.sft)
    removed = (
        parquet.read_table(root, "prompts", ctx.run_id, ctx.round, part="decontaminated").to_pylist()
        if parquet.exists(root, "prompts", ctx.run_id, ctx.round, part="decontaminated")
        else []
    )
    out = datacard.card_dir(root, ctx.run_id, ctx.round)
    draw = json.loads((out / DRAW).read_text()) if (out / DRAW).is_file() else None
    datacard.write(
        out,
        ctx.run_id,
        ctx.round,
        ctx.config.curation,
        curated.funnel,
        curated.pairs,
        curated.sft,
        removed,
        draw,
        labels,
    )
    catalog.refresh(root)
    return {
        "curate_seconds": time.perf_counter() - t0,
        "decontaminated_prompts": len(removed),
        **{f"pairs_{k}_share": v for k, v in labels.items() if v is not None},
        **pair_metrics(curated),
    }


def verifier_source(config) -> str | None:
    """The name of the first verifier among the judge's sources (None: no verifier in the loop)."""
    return next((s.key() for s in config.judge.sources if s.type == "verifier"), None)


def pair_labels(con: duckdb.DuckDBPyConnection, pairs: pa.Table, verifier: str | None) -> dict[str, float | None]:
    """Against the verifier (when there is one): the share of pairs whose chosen response is exactly
    correct, and whose rejected one is wrong."""
    if verifier is None or pairs.num_rows == 0:
        return {"chosen_exact": None, "rejected_wrong": None}
    con.register("cur_labelled", pairs.select(["chosen_id", "rejected_id"]))
    chosen, rejected = con.execute(f"""
        WITH v AS (SELECT candidate_id, score FROM judgments WHERE source = {catalog.sql_str(verifier)})
        SELECT avg(CASE WHEN c.score >= {_num(EXACT)} THEN 1.0 ELSE 0.0 END),
               avg(CASE WHEN r.score >= {_num(EXACT)} THEN 0.0 ELSE 1.0 END)
        FROM cur_labelled p
        LEFT JOIN v c ON c.candidate_id = p.chosen_id LEFT JOIN v r ON r.candidate_id = p.rejected_id
    """).fetchall()[0]
    con.unregister("cur_labelled")
    return {"chosen_exact": chosen, "rejected_wrong": rejected}


register(
    Stage(
        "curate",
        30,
        curate_task,
        fingerprint=lambda fp, s: short_hash("curate", fp),
        outputs=(("pairs", "*"), ("sft", "*")),
    )
)
