"""Progress for long stages: stage name, items done / total, items per second, time left.

On a terminal it is a live rich bar; elsewhere (CI logs, Prefect workers) a plain line is
printed every ~10% so logs show the run moving without flooding.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from uuid import UUID

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Progress and status go to stderr; results (tables) to stdout, so they can be piped. Off a
# terminal, lines are not wrapped at 80 columns (run ids and paths stay whole in logs).
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
results = Console(width=None if sys.stdout.isatty() else 200)


def say(text: str) -> None:
    """A plain status line (no rich markup: "[train]" is text, not a style)."""
    console.print(text, markup=False, highlight=False)


def eta(done: int, total: int, rate: float) -> str:
    """Time left at the current rate, as m:ss (h:mm:ss past an hour); "?" before any rate."""
    if rate <= 0 or done <= 0:
        return "?"
    left = max(total - done, 0) / rate
    h, rem = divmod(round(left), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


@contextlib.contextmanager
def stage(name: str, total: int, unit: str = "items", done: int = 0) -> Iterator[Callable[[int], None]]:
    """`done`: items already done before this call (a resumed stage); the rate counts only new ones."""
    start = time.perf_counter()
    already = done
    if console.is_terminal:
        with Progress(
            TextColumn(f"[bold]{name:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task(name, total=total, rate="", completed=done)

            def advance_bar(n: int) -> None:
                nonlocal done
                done += n
                rate = (done - already) / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=n, rate=f"{rate:.1f} {unit}/s")

            yield advance_bar
        return

    step = max(1, total // 10)
    next_report = done + step

    def advance(n: int) -> None:
        nonlocal done, next_report
        done += n
        if done >= next_report or done >= total:
            rate = (done - already) / max(time.perf_counter() - start, 1e-9)
            left = eta(done - already, total - already, rate)
            print(f"[{name}] {done}/{total} {unit} ({rate:.1f} {unit}/s, eta {left})", file=sys.stderr, flush=True)
            while next_report <= done:
                next_report += step

    yield advance


# --- Prefect's UI: what a user looking at a flow run sees -----------------------------------------


def _run_logger():
    """The current Prefect flow or task run's logger; None outside a run (a plain function call)."""
    try:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError
    except ImportError:
        return None
    try:
        return get_run_logger()
    except MissingContextError:
        return None


def log(text: str) -> None:
    """A line for the Prefect run's log (INFO): stage starts, counts, durations, decisions. The
    terminal shows only warnings from Prefect's loggers unless --verbose, so this adds no noise."""
    logger = _run_logger()
    if logger is not None:
        logger.info(text)


def name_flow_run(name: str) -> None:
    """Give the current flow run a meaningful name (the flywheel run id), once it is known."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run
    except ImportError:
        return
    run_id = flow_run.get_id()
    if run_id is None or flow_run.get_name() == name:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(UUID(run_id), name=name)


_SUMMARY_KEYS = (
    ("exact_match", "test exact match", "{:.1%}"),
    ("exact_match_low", "… 95% interval low", "{:.1%}"),
    ("exact_match_high", "… 95% interval high", "{:.1%}"),
    ("accuracy", "test mean score", "{:.1%}"),
    ("exact_match_gain", "exact-match gain vs champion (test)", "{:+.3f}"),
    ("exact_match_gain_low", "gain, 95% interval low", "{:+.3f}"),
    ("exact_match_gain_high", "gain, 95% interval high", "{:+.3f}"),
    ("validation_exact_match", "validation exact match (decides)", "{:.1%}"),
    ("pairs_chosen_exact_share", "pairs whose chosen is exactly correct", "{:.0%}"),
    ("scored_items", "scored items", "{}"),
    ("mean_response_tokens", "mean response tokens", "{:.1f}"),
    ("candidates", "candidates", "{}"),
    ("pairs", "pairs", "{}"),
    ("judge_verifier_agreement", "judge–verifier agreement", "{:.1%}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("generate_seconds", "generate s", "{:.0f}"),
    ("judge_seconds", "judge s", "{:.0f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("benchmark_seconds", "benchmark s", "{:.0f}"),
    ("round_seconds", "round s", "{:.0f}"),
)


def summary_markdown(run_id: str, round_: int, metrics: dict) -> str:
    rows = [
        f"| {label} | {fmt.format(metrics[key])} |"
        for key, label, fmt in _SUMMARY_KEYS
        if isinstance(metrics.get(key), (int, float))
    ]
    decision = "promoted to champion" if metrics.get("promoted") else "not promoted"
    reasons = "\n".join(f"- {r}" for r in metrics.get("promotion_reasons") or [])
    return (
        f"# flywheel run {run_id}, round {round_}: {decision}\n\n| metric | value |\n|---|---|\n"
        + "\n".join(rows)
        + f"\n\n**Promotion gate**\n\n{reasons}\n"
    )


def summary_key(run_id: str) -> str:
    """A round summary's Prefect artifact key: one history per flywheel run, its rounds in order.
    Keyed by the run, not the flywheel name: two workspaces that both keep the default name would
    otherwise interleave their summaries. Prefect allows lowercase letters, digits and dashes."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", f"flywheel-{run_id}-summary".lower()).strip("-")


def publish_summary(name: str, run_id: str, round_: int, metrics: dict) -> None:
    """The round's summary as a Prefect markdown artifact on the current flow run (key summary_key)."""
    if _run_logger() is None:
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=summary_markdown(run_id, round_, metrics),
        key=summary_key(run_id),
        description=f"flywheel {name}: run {run_id}, round {round_}",
    )
