"""Task sources, one module each, registered by name: see base.py (the `Task` interface and the one
definition of "exactly correct") and registry.py (`register`, the `flywheel.tasks` entry points)."""

from flywheel.models.tasks.base import EXACT, Item, Task, category, exactly_correct, extract_answer, numeric
from flywheel.models.tasks.registry import make, names, register

__all__ = [
    "EXACT",
    "Item",
    "Task",
    "category",
    "exactly_correct",
    "extract_answer",
    "make",
    "names",
    "numeric",
    "register",
]
