"""Task sources by name. A module registers its source with one call:

    register("my_task", factory=MyTask.from_config)

where `factory(task_config)` returns a `Task` (models/tasks/base.py). `task.prompts_file` picks
the prompts-file source; else `task.name` picks a registered source by its name, and any other
name is a reasoning-gym dataset. Modules in this package register at import; third-party
packages through the `flywheel.tasks` entry-point group (models/plugins.py)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from flywheel.errors import TaskError
from flywheel.models import plugins

GROUP = "flywheel.tasks"
PROMPTS_FILE = "prompts_file"  # chosen by task.prompts_file, never by task.name
FALLBACK = "reasoning_gym"  # any name not registered: a reasoning-gym dataset

_FACTORIES: dict[str, Callable[[Any], Any]] = {}


def register(name: str, *, factory: Callable[[Any], Any]) -> None:
    """Make `name` a task source: `factory(task_config)` builds it."""
    if _FACTORIES.get(name, factory) is not factory:
        raise TaskError(f"task source {name!r} is registered twice")
    _FACTORIES[name] = factory


def names() -> list[str]:
    _load()
    return sorted(_FACTORIES)


def make(task_cfg) -> Any:
    """The task source a task config names."""
    _load()
    if task_cfg.prompts_file is not None:
        return _FACTORIES[PROMPTS_FILE](task_cfg)
    by_name = _FACTORIES.get(task_cfg.name) if task_cfg.name != PROMPTS_FILE else None
    return (by_name or _FACTORIES[FALLBACK])(task_cfg)


def _load() -> None:
    if FALLBACK not in _FACTORIES:
        for m in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
            if m.name not in ("base", "registry"):
                importlib.import_module(f"{__package__}.{m.name}")
    plugins.load(GROUP, lambda: _FACTORIES)
