"""The `flywheel` command line: `run` a flywheel, query its data with `sql`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flywheel", description="Self-improvement data flywheel for language models.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a flywheel (defaults: 3 rounds of the embedded SmolLM2-135M on arithmetic)")
    run.add_argument("--config", type=Path, help="YAML config file; flags below override it")
    run.add_argument("--model", help="transformers model id, local checkpoint dir, or embedded:NAME")
    run.add_argument("--task", help="reasoning-gym dataset name, e.g. chain_sum, basic_arithmetic")
    run.add_argument("--task-option", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                     help="reasoning-gym difficulty option (repeatable), e.g. --task-option max_digits=2")
    run.add_argument("--prompts", type=Path, help="JSONL/Parquet prompts file ('prompt', optional 'answer')")
    run.add_argument("--rounds", type=int)
    run.add_argument("--samples", type=int, help="samples per prompt")
    run.add_argument("--prompts-per-round", type=int)
    run.add_argument("--benchmark-size", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--name", help="MLflow experiment / registered model name")
    run.add_argument("--workspace", type=Path, help="data directory (default ./flywheel-data)")
    run.add_argument("--verbose", action="store_true", help="show Prefect's own logs")

    sql = sub.add_parser("sql", help="run a SQL query against the workspace's DuckDB catalog")
    sql.add_argument("query")
    sql.add_argument("--workspace", type=Path, default=Path("flywheel-data"))
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        node = o
        *parents, leaf = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value

    put("model.name", args.model)
    put("task.name", args.task)
    if args.task or args.task_option:
        # Naming a task drops the default task's options: its difficulty knobs may not exist for another task.
        put("task.options", dict(args.task_option))
    put("task.prompts_file", str(args.prompts) if args.prompts else None)
    put("rounds", args.rounds)
    put("sampling.n", args.samples)
    put("task.prompts_per_round", args.prompts_per_round)
    put("benchmark.size", args.benchmark_size)
    put("seed", args.seed)
    put("name", args.name)
    put("workspace", str(args.workspace) if args.workspace else None)
    return o


def cmd_run(args: argparse.Namespace) -> int:
    from flywheel.config import load_config

    config = load_config(args.config, overrides_from_args(args))
    if not args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flywheel.flows.flywheel import flywheel, prepare
    from flywheel.progress import console

    prepare(config)  # bad input fails here, before Prefect starts or anything is written
    console.print(f"[bold]flywheel[/bold] {config.rounds} round(s) of {config.model.name} on "
                  f"{config.task.prompts_file or config.task.name} → {Path(config.workspace).resolve()}")
    result = flywheel(config)
    print_summary(result)
    return 0


def print_summary(result: dict) -> None:
    from rich.table import Table

    from flywheel.progress import console

    t = Table(title=f"flywheel run {result['run_id']}")
    for col in ("round", "accuracy", "pairs", "judge≈verifier", "mean length", "time", "promoted"):
        t.add_column(col, justify="right")

    def fmt(v: Any, pattern: str) -> str:
        return pattern.format(v) if isinstance(v, (int, float)) else "–"

    for r in result["rounds"]:
        t.add_row(str(r["round"]), fmt(r.get("accuracy"), "{:.1%}"), fmt(r.get("pairs"), "{:d}"),
                  fmt(r.get("judge_verifier_agreement"), "{:.1%}"), fmt(r.get("mean_response_tokens"), "{:.1f} tok"),
                  fmt(r.get("round_seconds"), "{:.0f} s"), "yes" if r.get("promoted") else "no")
    console.print(t)
    first, last = result["rounds"][0]["accuracy"], result["rounds"][-1]["accuracy"]
    console.print(f"held-out accuracy {first:.1%} → {last:.1%} after the last round "
                  f"({(last - first) * 100:+.1f} points); champion {result['champion_accuracy']:.1%}: "
                  f"{result['champion']}")
    console.print(f"MLflow run {result['mlflow_run_id']}; tables: flywheel sql \"SELECT * FROM rounds\"")


def cmd_sql(args: argparse.Namespace) -> int:
    from flywheel.storage import catalog

    table = catalog.query(args.workspace, args.query)
    if args.format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    elif args.format == "json":
        import json

        for row in table.to_pylist():
            print(json.dumps(row, default=str))
    else:
        from rich.table import Table

        from flywheel.progress import console

        t = Table(show_lines=False)
        for name in table.column_names:
            t.add_column(name)
        for row in table.to_pylist():
            t.add_row(*("NULL" if v is None else str(v) for v in row.values()))
        console.print(t, soft_wrap=True)
        console.print(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return 0


def quiet_libraries() -> None:
    """Our own progress lines say what is happening; the libraries' bars and notices only bury them."""
    for var, value in (("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
                       ("TOKENIZERS_PARALLELISM", "false"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
        os.environ.setdefault(var, value)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(mlflow|transformers|trl|peft|duckdb)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    from flywheel.config import ConfigError
    from flywheel.models.judges import RubricError
    from flywheel.models.loading import ModelNotFound
    from flywheel.models.tasksource import TaskError

    try:
        return {"run": cmd_run, "sql": cmd_sql}[args.command](args)
    except (ConfigError, TaskError, ModelNotFound, RubricError, FileNotFoundError) as e:
        print(f"flywheel: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flywheel: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - e.g. DuckDB's errors for `flywheel sql`
        import duckdb

        if isinstance(e, duckdb.Error):
            print(f"flywheel: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
