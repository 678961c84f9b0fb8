"""How fast the read-only commands answer: `flywheel --help`, `sql`, `runs`, `data show`, `compare`.

    .venv/bin/python benchmarks/cli_startup.py [--repeat 5]

Builds a small workspace (one run, three rounds of pairs, SFT rows, rounds and their manifests),
then times each command end to end in a fresh process (median of --repeat runs), next to two
baselines measured in the same run: a bare `python -c pass`, and importing the run path's
modules (`flywheel.flows.flywheel`: torch, transformers, prefect, mlflow), which is what every
command paid for before the read-only commands stopped importing them. Also prints which heavy
modules each command imported (none is the goal).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HEAVY = ("torch", "transformers", "trl", "prefect", "mlflow", "datasets")
RUN_ID = "20260101-000000-abcdef"


def synthetic_workspace(root: Path, rounds: int = 3, pairs_per_round: int = 64) -> Path:
    """A workspace with the tables and manifests a finished run leaves (made up, schema-exact)."""
    from flywheel.storage import catalog, manifest, parquet

    now = datetime.now(UTC)
    (root / "runs" / RUN_ID).mkdir(parents=True, exist_ok=True)
    (root / "runs" / RUN_ID / "config.yaml").write_text("name: bench-cli\n")
    for k in range(rounds + 1):
        result = {
            "round": k,
            "accuracy": 0.4 + 0.05 * k,
            "promoted": True,
            "pairs": pairs_per_round * (k > 0),
            "mean_response_tokens": 11.0,
            "generate_seconds": 90.0,
            "judge_seconds": 60.0,
            "train_seconds": 100.0,
            "benchmark_seconds": 30.0,
            "round_seconds": 280.0,
        }
        parquet.write_table(
            root,
            "rounds",
            RUN_ID,
            k,
            [
                dict(
                    run_id=RUN_ID,
                    round=k,
                    status="completed",
                    policy_in="base",
                    policy_out=f"m{k}",
                    weights_sha256=None,
                    reference_model=None,
                    config_hash="h",
                    judge_template_hash=None,
                    seed=0,
                    code_version="0",
                    package_versions="{}",
                    mlflow_run_id=None,
                    registered_version=None,
                    promoted=True,
                    promotion_reasons=None,
                    accuracy=result["accuracy"],
                    n_pairs=result["pairs"],
                    curriculum_level=None,
                    started_at=now,
                    finished_at=now,
                    error=None,
                )
            ],
        )
        manifest.write(root, RUN_ID, k, "round", "fp", result)
        if k == 0:
            continue
        parquet.write_table(
            root,
            "pairs",
            RUN_ID,
            k,
            [
                dict(
                    run_id=RUN_ID,
                    round=k,
                    pair_id=f"p{k}-{i}",
                    prompt_id=f"q{i}",
                    prompt=f"What is {i} + 1?",
                    chosen=str(i + 1),
                    rejected=str(i + 2),
                    chosen_score=1.0,
                    rejected_score=0.0,
                    margin=1.0,
                    rule="max_min",
                    reward="verifier",
                    chosen_id=f"c{k}-{i}",
                    rejected_id=f"r{k}-{i}",
                    category="synthetic",
                    chosen_tokens=2,
                    rejected_tokens=3,
                    cream_tau=None,
                )
                for i in range(pairs_per_round)
            ],
        )
        parquet.write_table(
            root,
            "sft",
            RUN_ID,
            k,
            [
                dict(
                    run_id=RUN_ID,
                    round=k,
                    prompt_id=f"q{i}",
                    prompt=f"What is {i} + 1?",
                    completion=str(i + 1),
                    score=1.0,
                    reward="verifier",
                    candidate_id=f"c{k}-{i}",
                    category="synthetic",
                    n_tokens=2,
                )
                for i in range(pairs_per_round)
            ],
        )
    catalog.refresh(root)
    return root


COMMANDS = {
    "--help": ["--help"],
    "sql": ["sql", "SELECT round, count(*) AS pairs FROM pairs GROUP BY ALL ORDER BY ALL", "--workspace", "{ws}"],
    "runs": ["runs", "--workspace", "{ws}"],
    "data show": ["data", "show", "pairs", "--limit", "3", "--workspace", "{ws}"],
    "compare": ["compare", RUN_ID, "--workspace", "{ws}", "--out", "{ws}/cmp.png"],
}

# Runs a command in-process and reports which heavy modules it imported.
_PROBE = """
import sys, json
from flywheel.flows import cli
try:
    rc = cli.main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "heavy": sorted(m for m in %r if m in sys.modules)}), file=sys.stderr)
""" % (HEAVY,)  # noqa: UP031 - the template is Python code full of braces


def timed(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def heavy_imports(args: list[str]) -> tuple[int, list[str]]:
    p = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True)
    report = json.loads(p.stderr.strip().splitlines()[-1])
    return report["rc"], report["heavy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    flywheel = str(Path(sys.executable).parent / "flywheel")
    with tempfile.TemporaryDirectory() as tmp:
        ws = synthetic_workspace(Path(tmp))
        bare = timed([sys.executable, "-c", "pass"], args.repeat)
        full = timed([sys.executable, "-c", "import flywheel.flows.flywheel"], args.repeat)
        print(f"read-only commands, median of {args.repeat} fresh processes (s)")
        print(f"  {'python -c pass':<28} {bare:6.2f}")
        print(f"  {'import the run path':<28} {full:6.2f}   (what every command paid before)")
        for name, template in COMMANDS.items():
            argv = [a.replace("{ws}", str(ws)) for a in template]
            seconds = timed([flywheel, *argv], args.repeat)
            rc, heavy = heavy_imports(argv)
            print(
                f"  flywheel {name:<19} {seconds:6.2f}   {seconds / full:5.2f}x of the run path's imports; "
                f"exit {rc}; heavy modules imported: {', '.join(heavy) or 'none'}"
            )


if __name__ == "__main__":
    main()
