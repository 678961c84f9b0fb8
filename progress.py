"""Progress for long stages: stage name, items done / total, items per second, time left.

On a terminal it is a live rich bar; elsewhere (CI logs, Prefect workers) a plain line is
printed every ~10% so logs show the run moving without flooding.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

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
    h, rem = divmod(int(round(left)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


@contextlib.contextmanager
def stage(name: str, total: int, unit: str = "items", done: int = 0) -> Iterator[Callable[[int], None]]:
    """`done`: items already done before this call (a resumed stage); the rate counts only new ones."""
    start = time.perf_counter()
    already = done
    if console.is_terminal:
        with Progress(TextColumn(f"[bold]{name:<10}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                      TimeRemainingColumn(), console=console, transient=False) as bar:
            task = bar.add_task(name, total=total, rate="", completed=done)

            def advance(n: int) -> None:
                nonlocal done
                done += n
                rate = (done - already) / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=n, rate=f"{rate:.1f} {unit}/s")

            yield advance
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
