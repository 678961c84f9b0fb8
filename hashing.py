"""How a setting enters the config hash (`FlywheelConfig.hash`: what the settings mean, which names a
round's work and lets --resume reuse it), declared in the setting's own `Field(json_schema_extra=…)`.
By default a field is hashed. NOT_HASHED: it changes how fast or where the work runs, or how much of
it, never what a round computes. HASHED_UNLESS_DEFAULT: at its default it is left out, so that adding
a setting keeps the hash of every config that does not use it (and their runs resumable).

One walker applies the marks to any settings model, the config's own and an engine's block alike."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

UNLESS_DEFAULT = "unless_default"
NOT_HASHED: dict[str, Any] = {"hashed": False}
HASHED_UNLESS_DEFAULT: dict[str, Any] = {"hashed": UNLESS_DEFAULT}


def hashed(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    """`model`'s JSON dump (`dumped`, changed in place) as the hash sees it: without the fields declared
    NOT_HASHED, without those declared HASHED_UNLESS_DEFAULT while they hold their default, each nested
    settings model by its own `hashed` (its overrides included)."""
    for name, field in type(model).model_fields.items():
        if name not in dumped:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        mark = extra.get("hashed", True)
        value = getattr(model, name)
        if mark is False or (mark == UNLESS_DEFAULT and value == field.get_default(call_default_factory=True)):
            dumped.pop(name)
        elif isinstance(value, BaseModel) and isinstance(dumped[name], dict):
            _nested(value, dumped[name])
        elif isinstance(value, list) and isinstance(dumped[name], list):
            for item, part in zip(value, dumped[name], strict=True):
                if isinstance(item, BaseModel) and isinstance(part, dict):
                    _nested(item, part)
    return dumped


def _nested(model: BaseModel, dumped: dict[str, Any]) -> None:
    own = getattr(model, "hashed", None)
    if callable(own):
        own(dumped)
    else:
        hashed(model, dumped)
