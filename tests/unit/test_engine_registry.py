"""An engine added by one registration, as a plugin package would add it: the config accepts it and
hashes its settings by meaning, the CLI offers it, open_engine opens it; installed packages add
engines through the `flywheel.engines` entry points, loaded once, a broken one named in one line."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest
from pydantic import Field

from flywheel import config as C
from flywheel.errors import ConfigError, EngineError
from flywheel.flows import cli
from flywheel.models import engines
from flywheel.models.engines import Backend, Engine, Generation, Settings, registry


class StubSettings(Settings):
    """The stub's own block: `model.stub: {…}`."""

    suffix: str = "!"  # changes what it answers: hashed
    threads: int = Field(1, ge=1)  # changes only how fast: not hashed


class StubEngine(Engine):
    name = "stub"

    def __init__(self, ref: str, settings: StubSettings) -> None:
        super().__init__(ref)
        self.settings = settings
        self.closed = False

    def greedy(self, prompts, *, max_new_tokens, batch_size, progress=None):
        return [Generation(p[::-1] + self.settings.suffix, 1, "stop", None, None) for p in prompts]

    def close(self) -> None:
        self.closed = True


STUB = Backend(
    "stub",
    factory=lambda cfg, ref: StubEngine(ref, cfg.settings),
    settings=StubSettings,
    speed_only={"threads"},
    preflight=lambda cfg, *, policy: None,
)


@pytest.fixture
def stub():
    registry.register(STUB)
    yield STUB
    engines.release()
    registry.unregister("stub")


def on_stub(**block) -> C.FlywheelConfig:
    return C.load_config(None, {"model": {"engine": "stub", "stub": block}})


def test_the_config_accepts_a_registered_engine_and_its_settings(stub):
    cfg = on_stub(threads=4)
    assert cfg.model.engine == "stub" and cfg.model.settings == StubSettings(threads=4)
    assert C.ModelConfig.model_validate(cfg.model.model_dump(mode="json")) == cfg.model  # round trip (workers)
    assert C.ModelConfig(engine="stub").settings == StubSettings()  # no block: the defaults
    with pytest.raises(ConfigError, match=r"model: stub: threads: Input should be greater than or equal to 1"):
        on_stub(threads=0)
    with pytest.raises(ConfigError, match=r"model: stub: colour: Extra inputs are not permitted"):
        on_stub(colour="red")
    with pytest.raises(ConfigError, match=r"model.colour: Extra inputs are not permitted"):
        C.load_config(None, {"model": {"engine": "stub", "colour": "red"}})


def test_its_speed_only_settings_leave_the_hash_alone(stub):
    base = on_stub()
    assert on_stub(threads=16).hash() == base.hash()
    assert on_stub(suffix="?").hash() != base.hash()
    assert base.hash() != C.FlywheelConfig().hash()


def test_the_cli_offers_it(stub):
    run = next(
        a
        for a in cli.build_parser()._subparsers._group_actions[0].choices["run"]._actions
        if "--engine" in a.option_strings
    )
    assert list(run.choices) == ["hf", "vllm", "stub"]  # openai cannot serve the policy: not offered
    assert cli.build_parser().parse_args(["run", "--engine", "stub"]).engine == "stub"


def test_open_engine_opens_it(stub):
    cfg = on_stub(suffix="?")
    engine = engines.open_engine(cfg.model, "ref")
    assert isinstance(engine, StubEngine) and engines.open_engine(cfg.model, "ref") is engine
    assert [g.response for g in engine.greedy(["ab"], max_new_tokens=1, batch_size=1)] == ["ba?"]
    engines.preflight(cfg)
    engines.release()
    assert engine.closed


def test_an_unknown_engine_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"^model.engine: unknown engine 'gguf' \(known: hf, vllm, openai\)$"):
        C.load_config(None, {"model": {"engine": "gguf"}})


def test_a_registration_is_checked():
    with pytest.raises(EngineError, match="speed_only names"):
        Backend("x", factory=StubEngine, settings=StubSettings, speed_only={"nope"})
    with pytest.raises(EngineError, match="registered twice"):
        registry.register(Backend("hf", factory=StubEngine))


@pytest.fixture
def entry_points(monkeypatch):
    """importlib.metadata's entry points replaced by the given ones; the registry reads them afresh."""
    found: list[importlib.metadata.EntryPoint] = []
    calls = []

    def fake(**kw):
        calls.append(kw)
        return [ep for ep in found if ep.group == kw.get("group")]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    yield found, calls
    registry.unregister("stub")


def test_an_installed_plugin_is_loaded_once(entry_points, monkeypatch):
    found, calls = entry_points
    module = types.ModuleType("flywheel_stub_plugin")
    module.STUB = STUB
    monkeypatch.setitem(sys.modules, "flywheel_stub_plugin", module)
    found.append(importlib.metadata.EntryPoint("stub", "flywheel_stub_plugin:STUB", registry.ENTRY_POINTS))
    assert registry.get("hf") and calls == []  # a built-in name reads no entry points
    assert on_stub().model.engine == "stub"
    assert "stub" in registry.names() and len(calls) == 1


def test_a_broken_plugin_fails_in_one_line_naming_it(entry_points):
    found, _ = entry_points
    found.append(importlib.metadata.EntryPoint("fast", "flywheel_no_such_plugin:BACKEND", registry.ENTRY_POINTS))
    with pytest.raises(
        ConfigError,
        match=r"^model.engine: engine plugin 'fast' \(flywheel_no_such_plugin:BACKEND\) "
        r"failed to load: ModuleNotFoundError: No module named "
        r"'flywheel_no_such_plugin'$",
    ):
        C.load_config(None, {"model": {"engine": "fast"}})
