"""Task sources: where prompts (and reference answers, and the verifier) come from. Each source
is one module in models/tasks/ (reasoning-gym, prompts file) or a plugin's, registered by name
(models/tasks/registry.py); this module draws from whichever the config names.

reasoning-gym items are generated from (seed + index); a flywheel draws training prompts and its
evaluation splits (validation: decisions; test: reported) from disjoint seed ranges, the splits
without replacement, and drops any training prompt that overlaps an evaluation item or that an
earlier round trained on (models/tasks/decontam.py; small task spaces repeat questions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from flywheel import seeds
from flywheel.errors import TaskError
from flywheel.models.tasks import registry
from flywheel.models.tasks.base import Item, Task
from flywheel.models.tasks.decontam import Decontaminator, Overlap, normal_forms


def make_source(task_cfg) -> Task:
    """The task source the config names (models/tasks/registry.py)."""
    return registry.make(task_cfg)


def variant(task_cfg, options: dict, where: str) -> Task:
    """The task with some of its options replaced (a transfer suite, a curriculum level); a bad
    option is a TaskError that names `where` it was set."""
    try:
        return make_source(task_cfg.model_copy(update={"options": {**task_cfg.options, **options}}))
    except TaskError as e:
        raise TaskError(f"{where}: {e}") from None


def transfer_suites(config) -> list[tuple[str, Task, list[Item]]]:
    """benchmark.transfer: (name, source, items) per suite, each its own test split (no validation)."""
    return [
        (t.name, src, benchmark_items(src, t.size, config.seed))
        for t in config.benchmark.transfer
        for src in [variant(config.task, t.options, f"benchmark.transfer {t.name!r}")]
    ]


class Level(NamedTuple):
    """A curriculum level above 0 (task.curriculum): its task source and its own held-out splits."""

    source: Task
    validation: list[Item]
    test: list[Item]


def curriculum_levels(config) -> list[Level]:
    """Levels 1.. of task.curriculum (level 0 is the task itself, with the run's own splits); none
    without a curriculum."""
    cur = config.task.curriculum
    if cur is None:
        return []
    out = []
    for k, options in enumerate(cur.levels, start=1):
        src = variant(config.task, options, f"task.curriculum level {k}")
        out.append(Level(src, *eval_items(src, cur.validation_size, cur.size, config.seed)))
    return out


def benchmark_items(source, size: int, seed: int) -> list[Item]:
    """The test split (validation size 0): see eval_items."""
    return eval_items(source, 0, size, seed)[1]


def eval_items(source, validation_size: int, test_size: int, seed: int) -> tuple[list[Item], list[Item]]:
    """(validation, test): distinct items, drawn without replacement, none sharing a normalised
    form with another (models/tasks/decontam.py: `3 + 5` and `5 + 3` are one item). A task space too
    small for the sizes gives fewer. From a finite task (a prompts file): at most a fifth of it, lines with a
    reference answer first (only those can be scored), validation first."""
    finite = source.pool()
    if finite is not None:
        n = min(validation_size + test_size, max(1, len(finite) // 5))
        pool = sorted(source.items(seed, len(finite)), key=lambda it: it.answer is None)
        picked = _distinct(pool, n)
        share = round(len(picked) * validation_size / max(1, validation_size + test_size))
        v = min(validation_size, max(share, 1 if len(picked) >= 2 and validation_size else 0))
        return picked[:v], picked[v:]
    want = validation_size + test_size
    base = seeds.evaluation(seed)
    more = (it for offset in range(0, 50 * max(want, 1), max(want, 1)) for it in source.items(base + offset, want))
    picked = _distinct(more, want)
    return picked[:validation_size], picked[validation_size:]


def _distinct(pool, n: int, used: set[str] | None = None) -> list[Item]:
    seen = set(used or ())
    out: list[Item] = []
    for it in pool:
        if len(out) == n:
            break
        forms = normal_forms(it.prompt, it.metadata)
        if forms & seen:
            continue
        seen |= forms
        out.append(it)
    return out


class Draw(NamedTuple):
    items: list[Item]  # the round's training prompts
    removed: list[tuple[Item, Overlap]]  # drawn, then dropped as overlapping an evaluation item
    repeats: int  # drawn, then skipped as a prompt (or a form of one) an earlier round trained on


def train_items(
    source, round_: int, size: int, seed: int, decontam: Decontaminator | None, earlier: Callable | None = None
) -> Draw:
    """Up to `size` distinct training prompts for round `round_`, none overlapping an evaluation
    item (decontam) and none that an earlier round of the run trained on (by normalised form):
    each round's prompts are fresh. The earlier rounds' draws are recomputed (they depend only on
    the seed and the settings), so a resumed run or a stage on another machine draws the same.
    Small task spaces repeat questions, so the draw goes on (bounded) until `size` prompts are
    found; a space too small for that yields fewer. `earlier(r)`: the source round r drew from, where
    rounds differ (a curriculum's levels); `source` for every round when None."""
    used: set[str] = set()
    draw = Draw([], [], 0)
    for r in range(1, max(round_, 1) + 1):
        src = source if earlier is None or r == round_ else earlier(r)
        draw = _draw_round(src, r, size, seed, decontam, used)
        used |= {f for it in draw.items for f in normal_forms(it.prompt, it.metadata)}
    return draw


def _draw_round(source, round_: int, size: int, seed: int, decontam: Decontaminator | None, used: set[str]) -> Draw:
    finite = source.pool()
    if finite is not None:
        pool = source.items(round_ * size, len(finite))
    else:
        base = seeds.training_draw(seed, round_)
        pool = [it for offset in range(0, 20 * size, size) for it in source.items(base + offset, size)]
    kept: dict[str, Item] = {}
    removed: dict[str, tuple[Item, Overlap]] = {}
    forms_kept: set[str] = set()
    repeats = 0
    for it in pool:
        if len(kept) == size:
            break
        if it.id in kept or it.id in removed:
            continue
        forms = normal_forms(it.prompt, it.metadata)
        if forms & used:
            repeats += 1
            continue
        if forms & forms_kept:
            continue  # the same problem in another form, already in this round
        hit = decontam.contaminated(it.prompt, it.metadata) if decontam else None
        if hit:
            removed[it.id] = (it, hit)
        else:
            kept[it.id] = it
            forms_kept |= forms
    return Draw(list(kept.values()), list(removed.values()), repeats)
