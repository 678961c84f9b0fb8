"""Every seed a flywheel run derives from its config's `seed`, in one place: which items a split draws,
which tokens a sample draws, which order training sees its pairs in. Each function is the whole rule for
its use; changing one changes a run's tables (tests/unit/test_golden_hash.py and the golden tables pin
them), so a new use gets a new function, never a changed one.

Evaluation items and training prompts are drawn from different bases (10M and 20M), so the two rarely
share a task seed; when they do share an item, whichever seeds made it, decontamination
(models/tasks/decontam.py) drops the training prompt."""

from __future__ import annotations

import hashlib
import random

EVALUATION_BASE = 10_000_000
TRAINING_BASE = 20_000_000


def evaluation(seed: int) -> int:
    """First task seed of the run's evaluation items (validation, test, guard suites)."""
    return EVALUATION_BASE + seed * 100_000


def training_draw(seed: int, round_: int) -> int:
    """First task seed of round `round_`'s training prompts: 10,000 seeds per round, 100 rounds per run seed."""
    return TRAINING_BASE + seed * 1_000_000 + round_ * 10_000


def stage(seed: int, round_: int) -> int:
    """The generate and judge stages' seed for a round (each sample's own seed derives from it: `row`)."""
    return seed * 1000 + round_


def top_up(stage_seed: int) -> int:
    """A frontier's second pass (sampling.frontier): its samples' seeds (`row`) derive from this one, so
    they differ from the probe's whatever the sample indices."""
    return _hashed(f"top-up\x00{stage_seed}")


def hint(stage_seed: int) -> int:
    """Hinted samples (sampling.hint): their seeds (`row`) derive from this one."""
    return _hashed(f"hint\x00{stage_seed}")


def training(seed: int, round_: int) -> int:
    """The train stage's and curation's seed for a round: below 2**31 (numpy's limit) since the
    config's seed is."""
    return seed + round_


def row(seed: int, prompt: str, sample: int) -> int:
    """Sample k of a prompt: its seed depends on nothing else (not the batch, not other prompts)."""
    return _hashed(f"{seed}\x00{sample}\x00{prompt}")


def rng(seed: int, key: object) -> random.Random:
    """A generator for one keyed draw (a candidate's sampled verdicts, a prompt's pairing ring), so
    that it does not depend on its batch neighbours."""
    return random.Random(f"{seed}:{key}")


def _hashed(key: str) -> int:
    """A non-negative 63-bit seed from `key`'s sha256."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)
