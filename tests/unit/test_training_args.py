"""train.dpo / train.sft: built into TRL's own config classes by one function, checked at config load."""

import dataclasses
from pathlib import Path

import pytest
import trl

from flywheel.config import FlywheelConfig, load_config
from flywheel.errors import ConfigError
from flywheel.models.training import args


def test_managed_fields_are_the_ones_flywheel_sets():
    assert set(args.MANAGED) == set(args.managed(Path("x"), 0, 5))
    # every managed field is a real TrainingArguments field, so a user's key is caught as managed,
    # not as unknown
    for klass in (trl.DPOConfig, trl.SFTConfig):
        assert set(args.MANAGED) <= {f.name for f in dataclasses.fields(klass)}


def test_the_config_builds_trl_classes_with_the_users_values_over_the_defaults(tmp_path):
    c = FlywheelConfig.model_validate({"train": {"dpo": {"beta": 0.3, "loss_type": ["sigmoid", "sft"]}}})
    built = args.build("dpo", c.train.dpo, output_dir=tmp_path, seed=7, checkpoint_steps=3)
    assert isinstance(built, trl.DPOConfig)
    assert built.beta == 0.3 and built.loss_type == ["sigmoid", "sft"]
    assert built.learning_rate == args.DPO_DEFAULTS["learning_rate"]
    assert (built.seed, built.save_steps, built.output_dir) == (7, 3, str(tmp_path))
    sft = args.build("sft", c.train.sft, output_dir=tmp_path, seed=1, checkpoint_steps=5)
    assert isinstance(sft, trl.SFTConfig) and sft.max_length == args.SFT_DEFAULTS["max_length"]


def test_a_number_yaml_reads_as_a_string_is_the_number_its_field_wants(tmp_path):
    # YAML 1.1 reads `5e-5` (no dot) as a string; TRL's class would keep it, and the optimizer fail
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  sft: {learning_rate: 5e-5, max_length: 1e3}\n  dpo: {beta: 1e-1}\n")
    c = load_config(path)
    assert (c.train.sft["learning_rate"], c.train.sft["max_length"], c.train.dpo["beta"]) == (5e-5, 1000, 0.1)
    assert isinstance(c.train.sft["max_length"], int)
    built = args.build("sft", c.train.sft, output_dir=tmp_path, seed=0, checkpoint_steps=5)
    assert built.learning_rate == 5e-5 and built.max_length == 1000
    with pytest.raises(ConfigError, match=r"^train.sft.max_length: 2.5: Input should be a valid integer"):
        load_config(None, {"train": {"sft": {"max_length": "2.5"}}})
    with pytest.raises(ConfigError, match=r"^train.sft.learning_rate: must be greater than 0, got -1e-05$"):
        load_config(None, {"train": {"sft": {"learning_rate": "-1e-5"}}})


def test_trls_loss_list_is_read():
    # read from TRL's own field documentation: if TRL changes how it documents losses, this fails
    # and `train.dpo.loss_type` would accept anything
    assert {"sigmoid", "ipo", "hinge"} <= args.losses()


@pytest.mark.parametrize(
    "method, given, expected",
    [  # beside the ones tests/unit/test_cli_errors.py runs through the CLI
        ("dpo", {"beta": "high"}, "train.dpo.beta: 'high'"),
        ("dpo", {"beta": 0}, "train.dpo.beta: must be greater than 0, got 0"),
        ("sft", {"report_to": ["wandb"]}, "train.sft: report_to is set by flywheel, not here"),
        ("sft", {"use_cpu": False}, "train.sft: use_cpu is set by flywheel, not here"),
        ("dpo", {"loss_weights": [0.5, 0.5]}, "train.dpo: `loss_weights` must have the same length"),
    ],
)
def test_a_bad_field_fails_at_load_naming_it(method, given, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"train": {method: given}})
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)
