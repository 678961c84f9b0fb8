"""The stage interface and its registry: a round is a loop over the registered stages, in order.

A stage declares what the round's loop needs to run it without knowing it:

  name         its manifest, its Prefect task run (`<name>-round-<k>`), `stages.<name>` placement
  order        where it sits in the round (generate 10, judge 20, curate 30, train 40, benchmark 50,
               promote 60): a new stage between curate and train takes 35
  task         the Prefect task, called as task(ctx, *args)
  args         (ctx, prepared, params, fingerprint) → the task's arguments, rebuilt from the run's
               config and `params` (ids and paths only), so the same call runs in the round's
               process or as a stage run on a work pool
  params       the round's state → those ids and paths
  fingerprint  (the previous stage's fingerprint, the round's state) → this stage's: a hash of its
               inputs, so a resumed run reuses a completed stage and recognises a changed one
  absorb       (the round's state, its result) → the state the stages after it see
  outputs      the (table, part glob)s it writes for its round: cleared before it runs again
  placeable    whether `stages.<name>.work_pool` may send it to a work pool

Adding a stage is one module that defines it and one `register(...)` call: every module of this
package is imported before the round reads the registry, and an installed package adds its own
through the `flywheel.stages` entry-point group (each entry point names the module to import).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flywheel.models import plugins
from flywheel.tasks.common import StageContext


@dataclass
class RoundState:
    """What one round's stages hand on: ids and paths, never models or tables."""

    config: Any  # FlywheelConfig
    round: int
    policy: str  # the model the round starts from
    base: str  # the run's starting model
    previous: str | None = None  # the policy the previous round started from (CREAM)
    reference: str | None = None  # the DPO reference the policy was trained against
    policy_out: str | None = None  # the round's model, once trained
    champion: Any = None  # tasks.promote.Champion: what the round must beat
    level: int | None = None  # the curriculum level the round trains at (task.curriculum; None: none)
    earlier_levels: list = field(default_factory=list)  # the earlier rounds' levels, round 1 first
    metrics: dict = field(default_factory=dict)  # every stage's result, merged in order


def _no_args(ctx: StageContext, prepared: Any, params: dict, fingerprint: str) -> tuple:
    return ()


def _no_params(state: RoundState) -> dict:
    return {}


def _merge(state: RoundState, result: dict) -> None:
    state.metrics |= result


@dataclass(frozen=True)
class Stage:
    name: str
    order: int
    task: Any
    fingerprint: Callable[[str | None, RoundState], str]
    args: Callable[[StageContext, Any, dict, str], tuple] = _no_args
    params: Callable[[RoundState], dict] = _no_params
    absorb: Callable[[RoundState, dict], None] = _merge
    outputs: tuple[tuple[str, str], ...] = ()
    placeable: bool = True
    baseline: bool = False  # also runs in round 0, on the starting model


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if stage.name in _REGISTRY and _REGISTRY[stage.name] is not stage:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    _REGISTRY[stage.name] = stage
    return stage


_LOADED = False


def _load() -> None:
    """Import every stage module once: this package's, then the entry points' (models/plugins.py:
    a plugin that fails to import, or registers no stage of its name, is a one-line error)."""
    global _LOADED
    if _LOADED:
        return
    import flywheel.tasks as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _LOADED = True
    plugins.load("flywheel.stages", lambda: _REGISTRY)


def stages() -> tuple[Stage, ...]:
    """The registered stages in round order."""
    _load()
    return tuple(sorted(_REGISTRY.values(), key=lambda s: s.order))


def names() -> tuple[str, ...]:
    return tuple(s.name for s in stages())


def get(name: str) -> Stage:
    for s in stages():
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r} (stages: {', '.join(names())})")
