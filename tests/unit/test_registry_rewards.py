"""The reward-source and task-source registries: a registered source is in the config, its schema
and the judge stage; an unknown type and a broken plugin fail in one line that names them."""

import json
from importlib.metadata import EntryPoint
from typing import Literal

import pytest

from flywheel import config as C
from flywheel.errors import ConfigError
from flywheel.models import plugins, rewards
from flywheel.models import tasks as task_registry
from flywheel.models.rewards.base import Source, Verdict


class ConstantSource(C._Source):
    type: Literal["constant_test"] = "constant_test"
    value: float = 1.0


class Constant(Source):
    def judge(self, batch, models, progress=None):
        return [Verdict(self.spec.value, True) for _ in batch.candidates]


@pytest.fixture
def constant():
    rewards.register("constant_test", spec=ConstantSource, source=Constant, threshold=0.5)
    yield
    rewards.unregister("constant_test")


def test_a_registered_source_is_in_the_config_its_schema_and_the_judge(constant):
    assert "constant_test" in json.dumps(C.FlywheelConfig.model_json_schema())
    cfg = C.load_config(overrides={"judge": {"sources": ["verifier", {"type": "constant_test", "value": 0.25}]}})
    assert isinstance(cfg.judge.sources[1], ConstantSource) and cfg.judge.sources[1].value == 0.25
    built = rewards.build(cfg.judge, None)
    assert [type(s) for s in built] == [rewards.Verifier, Constant]
    batch = rewards.Batch({"p": {"answer": None}}, [{"prompt_id": "p", "response": "x"}])
    assert built[1].judge(batch, rewards.Models("unused"))[0].score == 0.25
    assert rewards.get("constant_test").threshold == 0.5


def test_an_unregistered_source_is_gone_again_and_the_hash_is_unchanged(constant):
    before = C.FlywheelConfig().hash()
    rewards.unregister("constant_test")
    with pytest.raises(ConfigError, match="unknown type 'constant_test'"):
        C.load_config(overrides={"judge": {"sources": ["constant_test"]}})
    assert C.FlywheelConfig().hash() == before


def test_an_unknown_type_is_one_line_naming_the_known_types():
    with pytest.raises(ConfigError) as e:
        C.load_config(overrides={"judge": {"sources": ["verifier", "telepathy"]}})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("judge.sources.1: unknown type 'telepathy' (known: ")
    assert all(repr(name) in msg for name in rewards.entries())


def test_a_spec_without_its_literal_type_is_refused():
    with pytest.raises(ConfigError, match="needs a field type: Literal"):
        rewards.register("other_name", spec=ConstantSource, source=Constant)
    with pytest.raises(ConfigError, match="registered twice"):
        rewards.register(
            "verifier",
            spec=type(
                "VerifierSource", (C._Source,), {"__annotations__": {"type": Literal["verifier"]}, "type": "verifier"}
            ),
            source=Constant,
        )


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "no_such_module_for_flywheel",
            (
                "plugin 'broken' (no_such_module_for_flywheel, entry point group "
                "flywheel.test) failed to load: ModuleNotFoundError: No module named"
            ),
        ),
        ("json", "plugin 'broken' (json, entry point group flywheel.test) registered nothing named 'broken'"),
    ],
)
def test_a_broken_plugin_fails_in_one_line_naming_it(monkeypatch, value, message):
    eps = [EntryPoint(name="broken", value=value, group="flywheel.test")]
    monkeypatch.setattr(plugins, "entry_points", lambda group: eps if group == "flywheel.test" else [])
    monkeypatch.setattr(plugins, "_loaded", set())
    with pytest.raises(plugins.PluginError) as e:
        plugins.load("flywheel.test", dict)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    plugins.load("flywheel.test", dict)  # once: a second call does not try again


def test_a_registered_task_is_chosen_by_name_and_other_names_are_reasoning_gym(monkeypatch):
    made = []
    monkeypatch.setitem(task_registry.registry._FACTORIES, "tiny_test_task", made.append)
    task_registry.make(C.TaskConfig(name="tiny_test_task"))
    assert len(made) == 1 and made[0].name == "tiny_test_task"
    assert type(task_registry.make(C.TaskConfig())).__name__ == "ReasoningGymSource"
    assert {"prompts_file", "reasoning_gym", "tiny_test_task"} <= set(task_registry.names())
