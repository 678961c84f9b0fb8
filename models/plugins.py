"""Entry points of third-party packages: a package declares, in its pyproject.toml,

    [project.entry-points."flywheel.rewards"]
    my_source = "my_package.my_source"      # a module that calls flywheel.models.rewards.register
    [project.entry-points."flywheel.tasks"]
    my_task = "my_package.my_task"          # a module that calls flywheel.models.tasks.register

and importing the module registers it, exactly as a built-in module registers itself. Each
group is loaded once; a plugin that fails to import, or that registers nothing under its entry
point's name, fails with one line naming it."""

from __future__ import annotations

from collections.abc import Callable, Container
from importlib.metadata import entry_points

from flywheel.errors import ConfigError

_loaded: set[str] = set()


class PluginError(ConfigError):
    """A plugin that cannot be loaded: one line naming it."""


def load(group: str, registered: Callable[[], Container[str]]) -> None:
    """Import every entry point of `group`, once per process; `registered()` the names registered after."""
    if group in _loaded:
        return
    _loaded.add(group)
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        where = f"plugin {ep.name!r} ({ep.value}, entry point group {group})"
        try:
            ep.load()
        except Exception as e:  # any failure in a third-party module is reported the same way
            raise PluginError(_one_line(f"{where} failed to load: {type(e).__name__}: {e}")) from None
        if ep.name not in registered():
            raise PluginError(f"{where} registered nothing named {ep.name!r}")


def _one_line(text: str) -> str:
    return " ".join(text.split())
