"""`train.dpo` and `train.sft`: fields of TRL's own `DPOConfig` and `SFTConfig`, merged over flywheel's
defaults, checked and built by one function each, the same at config load (before any work), in the
train stage and in every process of a launched job.

flywheel sets a few TrainingArguments fields itself (`MANAGED`): where checkpoints go, the seed, where
metrics go. `managed()` is the one place that gives them values, and the keys of `MANAGED` are exactly
its keys (tests/unit/test_training_args.py), so a user setting one is told why it is not theirs."""

from __future__ import annotations

import dataclasses
import re
from functools import cache
from pathlib import Path
from typing import Any

# What DPO and SFT share. LoRA wants a larger step than full fine-tuning.
_SHARED: dict[str, Any] = {
    "learning_rate": 2e-4,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "constant",
    "max_length": 256,
    "logging_steps": 1,
}
# The reference model's log-probs are computed once, before training, rather than every epoch: the
# same loss, less time (docs/results/speed.md).
DPO_DEFAULTS: dict[str, Any] = {
    "beta": 0.1,
    **_SHARED,
    "precompute_ref_log_probs": True,
    "precompute_ref_batch_size": 32,
}
SFT_DEFAULTS: dict[str, Any] = dict(_SHARED)
DEFAULTS = {"dpo": DPO_DEFAULTS, "sft": SFT_DEFAULTS}
CLASSES = {"dpo": "DPOConfig", "sft": "SFTConfig"}

# TrainingArguments fields flywheel sets itself, and why a user does not: resume, lineage and
# tracking depend on them.
MANAGED = {
    "output_dir": "each round trains under <workspace>/checkpoints; set `workspace`",
    "seed": "the round's training seed derives from the top-level `seed`",
    "report_to": "metrics go to the round's MLflow run",
    "save_strategy": "resumable checkpoints every `stages.checkpoint_steps` steps",
    "save_steps": "set `stages.checkpoint_steps`",
    "save_total_limit": "flywheel keeps the last checkpoint for resume",
    "resume_from_checkpoint": "use `flywheel run --resume RUN`",
    "bf16": "mixed precision in bf16 where the GPU supports it, fp32 elsewhere",
    "use_cpu": "follows the device",
    "activation_checkpointing": "on for a GPU, off for the CPU (it costs compute a small CPU model does not save)",
    "dataloader_num_workers": "rows are in memory: no loader processes",
    "disable_tqdm": "progress is the stage's own line",
}

# Bounds TRL leaves to the training loop (where they would fail after generation and judging, or never).
_POSITIVE = (
    "learning_rate",
    "num_train_epochs",
    "beta",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "logging_steps",
)


class FieldProblem(ValueError):
    """A problem with one field of `train.<method>`: the config's error names `train.<method>.<key>`."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def managed(output_dir: Path, seed: int, checkpoint_steps: int) -> dict[str, Any]:
    """The values of the fields flywheel sets, for a training in `output_dir`."""
    import torch

    on_gpu = torch.cuda.is_available()
    return {
        "output_dir": str(output_dir),
        "seed": seed,
        "report_to": [],  # the stage passes its own MLflow callback
        "save_strategy": "steps",
        "save_steps": checkpoint_steps,
        "save_total_limit": 1,
        "resume_from_checkpoint": None,
        "bf16": on_gpu and torch.cuda.is_bf16_supported(),
        "use_cpu": not on_gpu,
        "activation_checkpointing": on_gpu,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def build(method: str, fields: dict[str, Any], *, output_dir: Path, seed: int, checkpoint_steps: int):
    """TRL's config object for `method` ("dpo" or "sft") from the user's checked fields."""
    import trl

    return getattr(trl, CLASSES[method])(**{**fields, **managed(output_dir, seed, checkpoint_steps)})


def check(method: str, given: Any, checkpoint_steps: int = 5) -> dict[str, Any]:
    """The user's mapping for `train.<method>` merged over the defaults, every value checked now: a
    field TRL's class does not have, one flywheel sets, a value of the wrong type, a bound TRL checks
    only while training, an unknown loss, then TRL's own checks by building the object. Raises
    ValueError with one line naming the field (FieldProblem where it is one field's value)."""
    if not isinstance(given, dict):
        raise ValueError(f"must be a mapping of trl.{CLASSES[method]} fields")
    klass = _klass(method)
    known = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(str(k) for k in set(given) - known)  # str: YAML keys may be numbers, dates, None
    if unknown:
        raise ValueError(f"unknown trl.{CLASSES[method]} field(s): {', '.join(unknown)}")
    mine = [k for k in given if k in MANAGED]
    if mine:
        raise ValueError(f"{mine[0]} is set by flywheel, not here ({MANAGED[mine[0]]})")
    given = {key: _number(klass, key, value) for key, value in given.items()}
    for key, value in given.items():
        problem = _field_problem(klass, key, value)
        if problem:
            raise FieldProblem(str(key), problem)
    fields = {**DEFAULTS[method], **given}
    try:
        build(method, fields, output_dir=Path("flywheel-check"), seed=0, checkpoint_steps=checkpoint_steps)
    except (ValueError, TypeError) as e:
        raise ValueError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    return fields


def _klass(method: str):
    import trl

    return getattr(trl, CLASSES[method])


@cache
def losses() -> frozenset[str]:
    """The DPO losses TRL knows, read from its `loss_type` field's documentation: TRL checks a loss
    name only when it computes the loss, after a round's sampling and judging."""
    help_text = next(f.metadata.get("help", "") for f in dataclasses.fields(_klass("dpo")) if f.name == "loss_type")
    return frozenset(re.findall(r"`'([a-z_]+)'`", help_text))


def _number(klass, key: Any, value: Any) -> Any:
    """A number given as a string, as YAML reads `5e-5` (no dot: YAML 1.1's floats need one), as the
    number its field wants: TRL's classes keep the string, and the optimizer fails on it."""
    import typing

    hint = _type_hints(klass).get(key)
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]  # `int | None`: int
    if not isinstance(value, str) or len(kinds) != 1 or kinds[0] not in (float, int):
        return value
    hint = kinds[0]
    try:
        number = float(value)
    except ValueError:
        return value  # not a number: the type check names it
    return int(number) if hint is int and number.is_integer() else number


def _field_problem(klass, key: str, value: Any) -> str | None:
    from pydantic import TypeAdapter, ValidationError

    hints = _type_hints(klass)
    if key in hints and key != "loss_type":  # TRL takes one loss as a plain string too
        try:
            adapter = TypeAdapter(hints[key])
        except Exception:  # a type pydantic cannot express: TRL's own check in `check` decides
            adapter = None
        if adapter is not None:
            try:
                adapter.validate_python(value)
            except ValidationError as e:
                return f"{value!r}: {e.errors()[0]['msg']}"
    if key in _POSITIVE and isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        return f"must be greater than 0, got {value!r}"
    if key == "loss_type":
        given = [value] if isinstance(value, str) else list(value)
        unknown = [x for x in given if x not in losses()]
        if unknown:
            return f"unknown loss {unknown[0]!r} (known: {', '.join(sorted(losses()))})"
    return None


@cache
def _type_hints(klass) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(klass)
    except Exception:  # unresolvable annotations: skip the type check, keep the others
        return {}
