"""The `flywheel` command line: `run` a flywheel, query its data with `sql`."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: a date like 2001-13-01
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a YAML value ({reason})") from None


# A run id names a folder under <workspace>/runs/: a plain name, never a path that leaves it.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _run_id(text: str) -> str:
    if not _RUN_ID.fullmatch(text) or ".." in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a run id (letters, digits, '.', '_', '-'; no '..')")
    return text


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return n


def one_line(text: str) -> str:
    """An error message as one line: line breaks and other control characters escaped, so a value
    quoted from a user's file can never break the message or forge a second line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, as flywheel's own errors are: the problem, then where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"flywheel: error: {one_line(message)} (see `{self.prog} -h`)\n")


class _PolicyEngines:
    """The registered engines that can serve the policy (models/engines/registry.py), read only when
    a value is checked or help is printed: the registry imports pydantic, which only `run` needs."""

    def _names(self) -> list[str]:
        from flywheel.models import engines

        return [n for n in engines.names() if engines.get(n).serves_policy]

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __iter__(self):
        return iter(self._names())


class _Stages(_PolicyEngines):
    """The registered stages (tasks/stage.py), read only when a value is checked or help is printed:
    the stage modules import the ML libraries, which only `run` needs."""

    def _names(self) -> list[str]:
        from flywheel.tasks import stage

        return list(stage.names())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flywheel", description="Self-improvement data flywheel for language models.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a flywheel (defaults: 3 rounds of the embedded SmolLM2-135M on arithmetic)")
    run.add_argument(
        "--preset",
        help="a shipped config: default, label_free (no verifier in the loop), star (SFT on right samples "
        "and hinted ones; needs reference answers)",
    )
    run.add_argument("--config", type=Path, help="YAML config file (over the preset); flags below override it")
    run.add_argument("--model", help="transformers model id, local checkpoint dir, or embedded:NAME")
    run.add_argument(
        "--engine",
        choices=_PolicyEngines(),
        metavar="ENGINE",
        help="who runs the policy: %(choices)s (hf: in-process transformers, the default; vllm: a GPU)",
    )
    run.add_argument("--task", help="reasoning-gym dataset name, e.g. chain_sum, basic_arithmetic")
    run.add_argument(
        "--task-option",
        action="append",
        type=_parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="reasoning-gym difficulty option (repeatable), e.g. --task-option max_digits=2",
    )
    run.add_argument("--prompts", type=Path, help="JSONL/Parquet prompts file ('prompt', optional 'answer')")
    run.add_argument("--rounds", "--max-rounds", type=int, dest="rounds", help="rounds to run (at most)")
    run.add_argument(
        "--until-no-improvement",
        type=int,
        metavar="K",
        help="stop after K rounds in a row whose model was not promoted",
    )
    run.add_argument("--resume", metavar="RUN_ID", type=_run_id, help="continue this run where it stopped")
    run.add_argument(
        "--force-from-stage",
        choices=_Stages(),
        metavar="STAGE",
        help="with --resume: redo this stage (%(choices)s) and the ones after it in the run's latest round, "
        "under the config given",
    )
    run.add_argument("--samples", type=int, help="samples per prompt")
    run.add_argument("--prompts-per-round", type=int)
    run.add_argument("--benchmark-size", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--name", help="MLflow experiment / registered model name")
    run.add_argument("--workspace", type=Path, help="data directory (default ./flywheel-data)")
    run.add_argument("--verbose", action="store_true", help="show Prefect's own logs")

    sql = sub.add_parser("sql", help="run a read-only SQL query against the workspace's DuckDB catalog")
    sql.add_argument("query")
    sql.add_argument("--workspace", type=Path, default=Path("flywheel-data"))
    sql.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    sql.add_argument("--out", type=Path, help="write the result to this file instead of standard output")

    runs = sub.add_parser("runs", help="list the workspace's runs with their status")
    runs.add_argument("--workspace", type=Path, default=Path("flywheel-data"))

    compare = sub.add_parser("compare", help="compare runs round by round (from the workspace) and plot them")
    compare.add_argument("run_ids", nargs="+", metavar="RUN", type=_run_id)
    compare.add_argument("--workspace", type=Path, default=Path("flywheel-data"))
    compare.add_argument("--out", type=Path, help="plot file (default: <workspace>/compare-<runs>.png)")
    compare.add_argument("--mlflow", action="store_true", help="also log the plot to each run's MLflow run")

    data = sub.add_parser("data", help="look at curated data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    show = data_sub.add_parser("show", help="print a readable sample of a round's pairs or SFT examples")
    show.add_argument("table", choices=["pairs", "sft"])
    show.add_argument("--run", type=_run_id, help="run id (default: the latest)")
    show.add_argument("--round", type=int, help="round (default: every round of the run)")
    show.add_argument("--limit", type=_positive_int, default=5, help="rows to show")
    show.add_argument("--workspace", type=Path, default=Path("flywheel-data"))

    export = sub.add_parser("export", help="export pairs or SFT examples as a Hugging Face dataset (TRL format)")
    export.add_argument("table", choices=["pairs", "sft"])
    export.add_argument("--run", type=_run_id, help="run id (default: the latest)")
    export.add_argument("--round", type=int, help="round (default: every round of the run)")
    export.add_argument("--to", type=Path, required=True, help="target directory (new or empty)")
    export.add_argument("--format", choices=["parquet", "jsonl", "hf"], default="hf")
    export.add_argument("--workspace", type=Path, default=Path("flywheel-data"))
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
    put("model.engine", args.engine)
    put("task.name", args.task)
    if args.task or args.task_option:
        # Naming a task drops the default task's options: its difficulty knobs may not exist for another task.
        put("task.options", dict(args.task_option))
    put("task.prompts_file", str(args.prompts) if args.prompts else None)
    put("rounds", args.rounds)
    put("promotion.stop_after", args.until_no_improvement)
    put("sampling.n", args.samples)
    put("task.prompts_per_round", args.prompts_per_round)
    put("benchmark.size", args.benchmark_size)
    put("seed", args.seed)
    put("name", args.name)
    put("workspace", str(args.workspace) if args.workspace else None)
    return o


def cmd_run(args: argparse.Namespace) -> int:
    from flywheel.config import deep_merge, load_config

    overrides = overrides_from_args(args)
    if args.resume and args.config is None and args.preset is None:
        # Resuming means the run's own settings; flags given beside --resume still apply on top.
        from flywheel.flows.flywheel import saved_config

        saved = saved_config(args.workspace or Path("flywheel-data"), args.resume)
        config = load_config(None, deep_merge(saved.model_dump(mode="json"), overrides))
    else:
        config = load_config(args.config, overrides, preset=args.preset)
    from flywheel.flows.server import starting_prefect_api

    # Prefect's API: the user's server when PREFECT_API_URL (or the profile) names one, else a local
    # one that this process owns and that dies with it, even by SIGKILL. It starts now, so that its
    # start overlaps the checks below; an error there stops it.
    with starting_prefect_api() as prefect_ready:
        if not args.verbose:
            import logging

            import mlflow  # noqa: F401 - configures its loggers on import; quiet them after that

            # MLflow's notices (model registered, CloudPickle) bury the progress lines; --verbose keeps them.
            logging.getLogger("mlflow").setLevel(logging.ERROR)
        from flywheel.flows.flywheel import check, flywheel, new_run_id
        from flywheel.progress import console
        from flywheel.storage import lock, tracking

        # Bad input, a busy workspace, an unreachable MLflow store: each fails here, as one line,
        # before any work (the flow checks again, for deployments). The workspace lock is taken
        # once and held to the end: the flow re-enters it, leaving no gap for a second run.
        check(config, args.resume, args.force_from_stage)
        with lock.workspace_lock(config.workspace):
            tracking.setup(config.workspace, config.name)
            console.print(
                f"[bold]flywheel[/bold] {config.rounds} round(s) of {config.model.name} on "
                f"{config.task.prompts_file or config.task.name} → {Path(config.workspace).resolve()}"
            )
            with prefect_ready():
                result = flywheel(
                    config,
                    resume=args.resume,
                    force_from_stage=args.force_from_stage,
                    run_id=None if args.resume else new_run_id(),
                )
    print_summary(result)
    return 0


def print_summary(result: dict) -> None:
    from rich.table import Table

    from flywheel.progress import console

    t = Table(title=f"flywheel run {result['run_id']}")
    for col in (
        "round",
        "test exact",
        "95% interval",
        "mean score",
        "validation exact",
        "pairs",
        "judge≈verifier",
        "mean length",
        "time",
        "promoted",
    ):
        t.add_column(col, justify="right")

    def fmt(v: Any, pattern: str) -> str:
        return pattern.format(v) if isinstance(v, (int, float)) else "–"

    for r in result["rounds"]:
        interval = (
            f"{r['exact_match_low']:.1%}–{r['exact_match_high']:.1%}"
            if isinstance(r.get("exact_match_low"), float)
            else "–"
        )
        t.add_row(
            str(r["round"]),
            fmt(r.get("exact_match"), "{:.1%}"),
            interval,
            fmt(r.get("accuracy"), "{:.1%}"),
            fmt(r.get("validation_exact_match"), "{:.1%}"),
            fmt(r.get("pairs"), "{:d}"),
            fmt(r.get("judge_verifier_agreement"), "{:.1%}"),
            fmt(r.get("mean_response_tokens"), "{:.1f} tok"),
            fmt(r.get("round_seconds"), "{:.0f} s"),
            "yes" if r.get("promoted") else "no",
        )
    from flywheel.progress import results

    results.print(t)
    first, last = result["rounds"][0].get("exact_match"), result["rounds"][-1].get("exact_match")
    if first is None or last is None:
        console.print(f"test split unscored (no reference answers); champion: {result['champion']}")
    else:
        last_round = result["rounds"][-1]
        gain = ""
        if isinstance(last_round.get("exact_match_gain_low"), float):
            gain = (
                f"; the last round vs its champion: {last_round['exact_match_gain'] * 100:+.1f} points, 95% interval "
                f"[{last_round['exact_match_gain_low'] * 100:+.1f}, {last_round['exact_match_gain_high'] * 100:+.1f}]"
            )
        console.print(
            f"test exact match {first:.1%} → {last:.1%} after the last round "
            f"({(last - first) * 100:+.1f} points{gain}); champion: {result['champion']}"
        )
    console.print(f'MLflow run {result["mlflow_run_id"]}; tables: flywheel sql "SELECT * FROM rounds"')


def cmd_sql(args: argparse.Namespace) -> int:
    from flywheel.storage import catalog

    if args.format == "parquet" and args.out is None and sys.stdout.isatty():
        raise catalog.ReadOnlyError("--format parquet is binary: give --out FILE or redirect standard output")
    table = catalog.query(args.workspace, args.query)
    if args.out is not None:
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                write_result(table, args.format, f)
            tmp.replace(args.out)  # an existing file is replaced whole or not at all
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        print(f"{table.num_rows} row(s) → {args.out}", file=sys.stderr)
    else:
        write_result(table, args.format, sys.stdout.buffer)
    return 0


def flat_for_csv(table):
    """CSV has no lists or structs: a nested cell (list, struct, map) is written as its JSON text, as
    --format json writes it (a map as a list of [key, value] pairs)."""
    import json

    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            cells = [None if v is None else json.dumps(v, default=str) for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.name, pa.array(cells, pa.string()))
    return table


def write_result(table, fmt: str, out) -> None:
    import io

    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(flat_for_csv(table), out)
    elif fmt == "json":
        import json

        for row in table.to_pylist():
            out.write((json.dumps(row, default=str) + "\n").encode())
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        buf = io.BytesIO()  # parquet needs a seekable sink; stdout may be a pipe
        pq.write_table(table, buf)
        out.write(buf.getvalue())
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(show_lines=False)
        for name in table.column_names:
            t.add_column(name)
        for row in table.to_pylist():
            t.add_row(*("NULL" if v is None else str(v) for v in row.values()))
        text = io.StringIO()
        Console(file=text, width=200 if out is not sys.stdout.buffer else None, soft_wrap=True).print(t)
        out.write(text.getvalue().encode())
        out.write(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})\n".encode())
    out.flush()


def cmd_runs(args: argparse.Namespace) -> int:
    from rich.table import Table

    from flywheel.progress import console
    from flywheel.storage import catalog, lock

    rows = catalog.query(
        args.workspace,
        """
        SELECT run_id, count(*) FILTER (WHERE status = 'completed') - 1 AS rounds,
               max(round) AS last_round, arg_max(status, round) AS last_status,
               max(accuracy) FILTER (WHERE round = 0) AS start_accuracy,
               arg_max(accuracy, round) FILTER (WHERE promoted) AS champion_accuracy,
               max(finished_at) AS updated
        FROM rounds GROUP BY run_id ORDER BY run_id""",
    ).to_pylist()
    busy = lock.busy(args.workspace)  # a probe: a run starting meanwhile waits it out (storage/lock.py)
    from flywheel.progress import results

    t = Table(title=f"runs in {args.workspace}")
    for col in ("run", "rounds done", "last round", "start acc.", "champion acc.", "status", "updated"):
        t.add_column(col)
    for i, r in enumerate(rows):
        done = (args.workspace / "runs" / r["run_id"] / f"round={r['last_round']}" / "round.done.json").is_file()
        status = "failed" if r["last_status"] == "failed" else "completed" if done else "interrupted"
        if busy and i == len(rows) - 1 and status != "completed":
            status = "running?"
        fmt = lambda v: "–" if v is None else f"{v:.1%}"  # noqa: E731
        t.add_row(
            r["run_id"],
            str(r["rounds"]),
            str(r["last_round"]),
            fmt(r["start_accuracy"]),
            fmt(r["champion_accuracy"]),
            status,
            str(r["updated"])[:19],
        )
    results.print(t)
    if any(r["last_status"] == "failed" for r in rows) or busy:
        console.print("resume an interrupted or failed run: flywheel run --resume RUN")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.table import Table

    from flywheel.progress import console, results
    from flywheel.storage import compare, plots

    rows = compare.collect(args.workspace, args.run_ids)
    t = Table(title=f"compare {', '.join(args.run_ids)}")
    heads = (
        "run",
        "round",
        "accuracy",
        "promoted",
        "pairs",
        "judge≈verifier",
        "mean length",
        "gen s",
        "judge s",
        "train s",
        "bench s",
    )
    for h in heads:
        t.add_column(h, justify="right")
    fmt = lambda v, p: "–" if v is None else p.format(v)  # noqa: E731
    for r in rows:
        t.add_row(
            r["run"],
            str(r["round"]),
            fmt(r.get("accuracy"), "{:.1%}"),
            "yes" if r.get("promoted") else "no",
            fmt(r.get("pairs"), "{:.0f}"),
            fmt(r.get("judge_verifier_agreement"), "{:.1%}"),
            fmt(r.get("mean_response_tokens"), "{:.1f}"),
            *(fmt(r.get(f"{s}_seconds"), "{:.0f}") for s in ("generate", "judge", "train", "benchmark")),
        )
    results.print(t)
    out = args.out or args.workspace / f"compare-{'-'.join(r[-6:] for r in args.run_ids)}.png"
    plots.compare_plot(rows, out)
    if args.mlflow:
        compare.log_plot(args.workspace, args.run_ids, out)
        console.print(f"plot: {out} (also logged to each run's MLflow run under compare/)")
    else:
        console.print(f"plot: {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from rich.panel import Panel

    from flywheel.progress import console
    from flywheel.storage import export

    rows, run_id = export.select(args.workspace, args.table, args.run, args.round)
    rows = rows.to_pylist()
    where = f"run {run_id}" + ("" if args.round is None else f", round {args.round}")
    console.print(f"[bold]{args.table}[/bold] of {where}: {len(rows)} row(s), showing {min(args.limit, len(rows))}")
    for r in rows[: args.limit]:
        if args.table == "pairs":
            body = (
                f"[bold]prompt[/bold]   {r['prompt']}\n"
                f"[green]chosen[/green]   ({r['chosen_score']:.3g}, {r['chosen_tokens']} tok) {r['chosen']}\n"
                f"[red]rejected[/red] ({r['rejected_score']:.3g}, {r['rejected_tokens']} tok) {r['rejected']}"
            )
            title = f"round {r['round']} · {r['rule']} on {r['reward']} · margin {r['margin']:.3g} · {r['category']}"
        else:
            body = (
                f"[bold]prompt[/bold]     {r['prompt']}\n[green]completion[/green] ({r['score']:.3g}) {r['completion']}"
            )
            title = f"round {r['round']} · {r['reward']} · {r['category']}"
        console.print(Panel(body, title=title, title_align="left"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flywheel.storage import export

    to, n = export.export(args.workspace, args.table, args.run, args.round, args.to, args.format)
    print(f"exported {n} {args.table} row(s) as {args.format} → {to}", file=sys.stderr)
    return 0


def quiet_libraries(verbose: bool = False) -> None:
    """Our own progress lines say what is happening; the libraries' bars and notices only bury them.
    Without --verbose no library warning reaches the terminal (flywheel's own errors still do)."""
    for var, value in (
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ("TQDM_DISABLE", "1"),
    ):  # TRL's own bars (reference log-probs) ignore disable_tqdm
        os.environ.setdefault(var, value)
    import warnings

    if not verbose:
        warnings.simplefilter("ignore")
        # worker processes a run starts (TRL's, a served engine's) inherit the same quiet
        os.environ.setdefault("PYTHONWARNINGS", "ignore")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    quiet_libraries(verbose)
    if not verbose:
        # Before anything imports prefect (it reads its settings once): flywheel's stage logs go to
        # the Prefect run at INFO, so its UI shows what happened; the terminal shows warnings only.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    # Only what the command needs is imported: the errors live in a light module, so `sql`, `runs`
    # or `data show` never pay for torch, transformers, prefect or mlflow.
    from flywheel.errors import UserError

    try:
        commands = {
            "run": cmd_run,
            "sql": cmd_sql,
            "data": cmd_data,
            "export": cmd_export,
            "runs": cmd_runs,
            "compare": cmd_compare,
        }
        return commands[args.command](args)
    except (UserError, OSError) as e:
        print(f"flywheel: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flywheel: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # e.g. DuckDB's errors for `flywheel sql`
        duckdb = sys.modules.get("duckdb")
        if duckdb is not None and isinstance(e, duckdb.Error):
            print(f"flywheel: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        raise


def entry() -> None:
    """The `flywheel` console script: main(), then an exit without the interpreter's last garbage
    collections. A `run` leaves a heap of torch, transformers, Prefect and MLflow objects that
    those collections would walk for about 2.5 s at exit; frozen, they are skipped (exit handlers,
    flushes and finalizers of objects freed normally still run). Not in main(): callers that go on
    in the same process (tests) must keep collecting their garbage."""
    rc = main()
    import gc

    gc.freeze()
    sys.exit(rc)


if __name__ == "__main__":
    entry()
