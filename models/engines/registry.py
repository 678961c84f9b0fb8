"""Every engine flywheel can open, by name: one `register` call per backend.

A registration declares everything the rest of flywheel needs to know about a backend:

    name        what `model.engine` (and `flywheel run --engine`) says
    factory     (model config, ref) → an open Engine; called by open_engine
    settings    the backend's own block of a model config (`model.<name>:`), a pydantic model, or None
    speed_only  the fields of that block that change only speed or where a server is: not hashed
    preflight   (model config, policy=…) → None; raises, in one line, what would stop the engine
                before any work (a missing package, key or checkpoint)
    ref         (model config) → what open_engine is given for a judge's own model; by default the
                checkpoint, resolved and checked
    serves_policy  whether it can run the policy (which is retrained every round): `flywheel run
                --engine` offers it
    check       (model config) → None; raises ValueError for settings the engine cannot honour, when
                the config is validated (so the message names the field)

An installed package adds a backend with an entry point in the group `flywheel.engines`: its object
is a `Backend`, or a module that calls `register` on import under the entry point's name. The group
is read once, the first time a name is looked up that is not built in (or the full list is asked
for); a plugin that fails to load fails in one line naming it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel.errors import EngineError
from flywheel.models.engines import openai, vllm
from flywheel.models.engines.base import Engine, check_checkpoint, checkpoint_ref

if TYPE_CHECKING:
    from pydantic import BaseModel

ENTRY_POINTS = "flywheel.engines"
DEFAULT = "hf"  # a config on the default engine hashes without `engine` (config.ModelConfig.hashed)


@dataclass(frozen=True)
class Backend:
    name: str
    factory: Callable[[Any, str], Engine]
    settings: type[BaseModel] | None = None
    speed_only: frozenset[str] = field(default_factory=frozenset)
    preflight: Callable[..., None] = check_checkpoint
    ref: Callable[[Any], str] = checkpoint_ref
    check: Callable[[Any], None] | None = None
    serves_policy: bool = True

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise EngineError(f"engine name {self.name!r} must be an identifier (it is a key of the model config)")
        unknown = set(self.speed_only) - set(getattr(self.settings, "model_fields", {}))
        if unknown:
            raise EngineError(f"engine {self.name}: speed_only names {sorted(unknown)}, which its settings lack")
        object.__setattr__(self, "speed_only", frozenset(self.speed_only))


_BACKENDS: dict[str, Backend] = {}
_LOCK = threading.Lock()
_plugins_loaded = False


def register(backend: Backend) -> Backend:
    """Add a backend; a second registration under a name already taken is an error."""
    with _LOCK:
        if _BACKENDS.get(backend.name, backend) is not backend:
            raise EngineError(f"engine {backend.name!r} is registered twice")
        _BACKENDS[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    with _LOCK:
        _BACKENDS.pop(name, None)


def get(name: str) -> Backend:
    """The backend registered as `name`; an unknown name fails in one line naming the known ones."""
    backend = _BACKENDS.get(name)
    if backend is None:
        _load_plugins()
        backend = _BACKENDS.get(name)
    if backend is None:
        raise EngineError(f"unknown engine {name!r} (known: {', '.join(names())})")
    return backend


def names() -> list[str]:
    """Every registered engine's name, built-in and installed, in registration order."""
    _load_plugins()
    return list(_BACKENDS)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    from importlib.metadata import entry_points

    with _LOCK:
        if _plugins_loaded:
            return
        _plugins_loaded = True
        found = sorted(entry_points(group=ENTRY_POINTS), key=lambda e: e.name)
    for ep in found:
        try:
            backend = ep.load()
        except Exception as e:  # a plugin's own bug, whatever it is, is one line naming it
            reason = str(e).splitlines()[0] if str(e) else ""
            raise EngineError(
                f"engine plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {reason}".rstrip(": ")
            ) from None
        if isinstance(backend, Backend):
            register(backend)
        elif ep.name not in _BACKENDS:  # a module that registers itself on import, as reward plugins do
            raise EngineError(f"engine plugin {ep.name!r} ({ep.value}) registered no engine named {ep.name!r}")


def _open_hf(model_cfg, ref: str) -> Engine:
    from flywheel.models.engines import hf  # torch and transformers load when an hf engine opens, not on import

    return hf.open_hf(model_cfg, ref)


register(Backend("hf", factory=_open_hf))
register(
    Backend(
        "vllm", factory=vllm.open_vllm, settings=vllm.VLLMSettings, speed_only=vllm.SPEED_ONLY, preflight=vllm.preflight
    )
)
register(
    Backend(
        "openai",
        factory=openai.open_openai,
        settings=openai.OpenAISettings,
        speed_only=openai.SPEED_ONLY,
        preflight=openai.preflight,
        ref=openai.served_name,
        check=openai.check,
        serves_policy=False,
    )
)
