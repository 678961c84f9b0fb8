"""Reward sources by type. A module registers its source with one call:

    register("my_source", spec=MySourceSpec, source=MySource, threshold=0.5, health=my_health)

`spec` is the pydantic config model (a `type: Literal["my_source"]` field, extending
config._Source); `source` the `Source` subclass that judges; `threshold` the score at or above
which a verdict counts as "good" when the judge's health compares it with the verifier (None:
not compared); `health(judged_rows, prompts)` its own judge-health figures ({metric: value}).
The config's `judge.sources` union is built from what is registered here: the modules of this
package, then the `flywheel.rewards` entry points of installed packages (models/plugins.py)."""

from __future__ import annotations

import importlib
import pkgutil
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flywheel.errors import ConfigError
from flywheel.models import plugins

if TYPE_CHECKING:
    from pydantic import BaseModel

    from flywheel.models.rewards.base import Source

GROUP = "flywheel.rewards"
_NOT_SOURCES = ("base", "registry")


@dataclass(frozen=True)
class Entry:
    name: str
    spec: type[BaseModel]  # the pydantic config model
    source: type[Source]  # the Source subclass
    threshold: float | None = None
    health: Callable[[list[dict], dict[str, dict]], dict[str, float | None]] | None = None


_ENTRIES: dict[str, Entry] = {}
_listeners: list[Callable[[], None]] = []
_builtins_loaded = False


def register(
    name: str,
    *,
    spec: type[BaseModel],
    source: type[Source],
    threshold: float | None = None,
    health: Callable[[list[dict], dict[str, dict]], dict[str, float | None]] | None = None,
) -> None:
    """Make `name` a reward source type: `judge.sources: [{type: name, ...}]` validates as `spec`
    and judges with `source`."""
    field = getattr(spec, "model_fields", {}).get("type")
    if field is None or typing.get_args(field.annotation) != (name,) or field.default != name:
        raise ConfigError(
            f"reward source {name!r}: its spec {spec.__name__} needs a field type: Literal[{name!r}] = {name!r}"
        )
    known = _ENTRIES.get(name)
    if known is not None and known.spec is not spec:
        raise ConfigError(f"reward source {name!r} is registered twice ({known.spec.__module__}, {spec.__module__})")
    _ENTRIES[name] = Entry(name, spec, source, threshold, health)
    for notify in _listeners:
        notify()


def unregister(name: str) -> None:
    """Remove a registered type (a source registered for a while, e.g. in a notebook)."""
    if _ENTRIES.pop(name, None) is not None:
        for notify in _listeners:
            notify()


def on_change(fn: Callable[[], None]) -> None:
    """Call `fn` whenever the registered types change (the config rebuilds its union)."""
    _listeners.append(fn)


def entries() -> dict[str, Entry]:
    """Every registered type: this package's modules, then the installed plugins."""
    load()
    return dict(_ENTRIES)


def get(name: str) -> Entry | None:
    load()
    return _ENTRIES.get(name)


def spec_union() -> Any:
    """The `judge.sources` item type: a union of the registered specs, told apart by `type`."""
    from pydantic import Field

    # by name: the same order whichever module was imported first
    specs = tuple(e.spec for _, e in sorted(entries().items()))
    return typing.Annotated[typing.Union[specs], Field(discriminator="type")]  # noqa: UP007 - built at runtime


def load() -> None:
    """Import this package's source modules (each registers itself), then the plugins; once."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for m in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
            if m.name not in _NOT_SOURCES:
                importlib.import_module(f"{__package__}.{m.name}")
    plugins.load(GROUP, lambda: _ENTRIES)
