"""Curation at scale: the default rule (max_min) over 10 million synthetic judgment rows.

    .venv/bin/python benchmarks/curate.py [--prompts 1000000] [--candidates 10] [--memory-limit 3GB]

Writes 1M prompts × 10 candidates (and one verifier judgment per candidate, 1% NULL) as Parquet
with the flywheel schemas, then runs, each in a fresh process so that peak memory is its own:
  duckdb  flywheel's curation (tasks/curate.py: pairs, SFT set and the funnel counts)
  pandas  the same max_min pairs with pandas (read, merge, per-prompt best/worst), the baseline
and prints seconds, judgment rows/s, peak RSS, and the pandas/duckdb ratios. The pair sets are
compared for equality.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def generate(root: Path, n_prompts: int, n_cands: int) -> None:
    import duckdb

    con = duckdb.connect()
    run = "'bench-run'"
    con.execute(f"""COPY (
        SELECT {run} AS run_id, 1::INTEGER AS round, md5(i::VARCHAR) AS prompt_id, 'train' AS split,
               'synthetic' AS task, 'synthetic/num_terms=' || (2 + i % 4) AS category, i::BIGINT AS seed,
               'What is ' || i || ' + 1?' AS prompt, (i + 1)::VARCHAR AS answer, '{{}}' AS metadata
        FROM range({n_prompts}) t(i)) TO '{root}/prompts.parquet' (FORMAT parquet)""")
    con.execute(f"""COPY (
        SELECT {run} AS run_id, 1::INTEGER AS round, md5(i || ':' || k)[1:16] AS candidate_id,
               md5(i::VARCHAR) AS prompt_id, 'm' AS policy, k::INTEGER AS sample_index, 0::BIGINT AS seed,
               CASE WHEN hash(i, k) % 3 = 0 THEN (i + 1)::VARCHAR ELSE (i + 1 + k)::VARCHAR END AS response,
               (1 + hash(i, k) % 40)::INTEGER AS n_tokens, 'stop' AS finish_reason, -1.0 AS mean_logprob,
               1.0 AS self_certainty, '{{}}' AS sampling
        FROM range({n_prompts}) t(i), range({n_cands}) c(k)) TO '{root}/candidates.parquet' (FORMAT parquet)""")
    con.execute(f"""COPY (
        SELECT {run} AS run_id, 1::INTEGER AS round, md5(i || ':' || k)[1:16] AS candidate_id,
               md5(i::VARCHAR) AS prompt_id, 'verifier' AS source, 'h' AS spec_hash,
               CASE WHEN hash(i, k, 'null') % 100 = 0 THEN NULL
                    WHEN hash(i, k) % 3 = 0 OR k = 0 THEN 1.0 ELSE 0.0 END AS score,
               true AS parse_ok, NULL::VARCHAR AS raw, NULL::VARCHAR AS details
        FROM range({n_prompts}) t(i), range({n_cands}) c(k)) TO '{root}/judgments.parquet' (FORMAT parquet)""")


def run_duckdb(root: Path, memory_limit: str) -> dict:
    import duckdb

    from flywheel.config import CurationConfig
    from flywheel.tasks.curate import curate

    t0 = time.perf_counter()
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{memory_limit}'")
    for t in ("prompts", "candidates", "judgments"):
        con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{root}/{t}.parquet')")
    curated = curate(con, CurationConfig())
    seconds = time.perf_counter() - t0
    ids = sorted(zip(curated.pairs.column("chosen_id").to_pylist(), curated.pairs.column("rejected_id").to_pylist()))
    (root / "duckdb_pairs.json").write_text(json.dumps(ids))
    return {"seconds": seconds, "pairs": curated.pairs.num_rows, "sft": curated.sft.num_rows}


def run_pandas(root: Path) -> dict:
    import pandas as pd

    t0 = time.perf_counter()
    prompts = pd.read_parquet(root / "prompts.parquet", columns=["prompt_id", "prompt"])
    cands = pd.read_parquet(
        root / "candidates.parquet", columns=["candidate_id", "prompt_id", "sample_index", "response"]
    )
    judg = pd.read_parquet(root / "judgments.parquet", columns=["candidate_id", "source", "score"])
    reward = judg[judg.source == "verifier"].groupby("candidate_id", sort=False)["score"].max().rename("reward")
    df = cands.merge(reward, left_on="candidate_id", right_index=True).dropna(subset=["reward"])
    df["norm"] = df["response"].str.strip().str.replace(r"\s+", " ", regex=True)
    df = df.sort_values(
        ["prompt_id", "norm", "reward", "sample_index", "candidate_id"], ascending=[True, True, False, True, True]
    )
    df = df.drop_duplicates(["prompt_id", "norm"])
    order = ["prompt_id", "reward", "sample_index", "candidate_id"]
    best = df.sort_values(order, ascending=[True, False, True, True]).drop_duplicates("prompt_id")
    worst = df.sort_values(order, ascending=[True, True, True, True]).drop_duplicates("prompt_id")
    pairs = best.merge(worst, on="prompt_id", suffixes=("_c", "_r"))
    pairs = pairs[(pairs.reward_c - pairs.reward_r >= 0.5) & (pairs.norm_c != pairs.norm_r)]
    pairs = pairs.merge(prompts, on="prompt_id")
    seconds = time.perf_counter() - t0
    ids = sorted(zip(pairs.candidate_id_c.tolist(), pairs.candidate_id_r.tolist()))
    (root / "pandas_pairs.json").write_text(json.dumps(ids))
    return {"seconds": seconds, "pairs": len(pairs)}


def child(engine: str, root: Path, memory_limit: str) -> None:
    result = run_duckdb(root, memory_limit) if engine == "duckdb" else run_pandas(root)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=1_000_000)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--memory-limit", default="3GB", help="DuckDB's memory_limit (it spills beyond it)")
    ap.add_argument("--child", choices=["duckdb", "pandas"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.root, args.memory_limit)
        return
    rows = args.prompts * args.candidates
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        generate(root, args.prompts, args.candidates)
        print(
            f"synthetic data: {args.prompts:,} prompts × {args.candidates} candidates = {rows:,} judgment rows "
            f"({time.perf_counter() - t0:.1f} s to write)"
        )
        results = {}
        for engine in ("duckdb", "pandas"):
            p = subprocess.run(
                [sys.executable, __file__, "--child", engine, "--root", str(root), "--memory-limit", args.memory_limit],
                capture_output=True,
                text=True,
            )
            if p.returncode != 0:
                print(f"{engine} failed:\n{p.stderr[-2000:]}")
                continue
            results[engine] = r = json.loads(p.stdout.strip().splitlines()[-1])
            print(
                f"  {engine:<7}: {r['seconds']:7.1f} s  {rows / r['seconds'] / 1e6:6.2f} M rows/s  "
                f"peak RSS {r['peak_rss_gb']:5.2f} GB  pairs {r['pairs']:,}"
            )
        if len(results) == 2:
            d, p_ = results["duckdb"], results["pandas"]
            same = (root / "duckdb_pairs.json").read_text() == (root / "pandas_pairs.json").read_text()
            print(
                f"  pandas / duckdb: time {p_['seconds'] / d['seconds']:.2f}x, "
                f"peak memory {p_['peak_rss_gb'] / d['peak_rss_gb']:.2f}x; identical pairs: {same}"
            )
            print(
                f"  target (duckdb): < 30 s → {'met' if d['seconds'] < 30 else 'MISSED'}; "
                f"< 4 GB → {'met' if d['peak_rss_gb'] < 4 else 'MISSED'}"
            )


if __name__ == "__main__":
    main()
