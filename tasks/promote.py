"""The promotion gate: does a round's model become the champion the next round starts from?

Decided on the validation split only (the test split is reported, never used for a decision): the
round's exact-match accuracy must beat the champion's by `min_improvement` (rule `point`), or the
lower end of the paired-bootstrap 95% interval of its gain must (rule `interval`); its mean
response length may grow at most `max_length_growth` (a share of the champion's) or at most
`length_slack_tokens` (so that short answers may gain a few words); and no guard (out-of-domain)
suite may drop more than its `max_drop` below the starting model's (round 0's) score. Guards are
measured against the run's start, not the champion, so that small drops cannot add up over
promotions and a champion that gained on a guard by chance does not block the next round for
falling back. With
`guard_rule: significant` (the default) a drop blocks only when its paired 95% interval lies below
0 as well, so that a small suite's noise does not block a round. Every check's outcome is a
reason, recorded in the rounds table and in MLflow.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from flywheel.config import PromotionConfig
from flywheel.models.tasks.base import exactly_correct

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion k/n (well-behaved at 0, n and small n)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(
    new: Sequence[float], old: Sequence[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float] | None:
    """(mean gain, 2.5th, 97.5th percentile) of mean(new − old) over the same items, resampling items
    with replacement: the round-vs-champion difference with its 95% interval. None with no items."""
    if len(new) != len(old):
        raise ValueError("paired scores must cover the same items")
    diffs = [a - b for a, b in zip(new, old)]
    if not diffs:
        return None
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return sum(diffs) / n, means[int(0.025 * (resamples - 1))], means[math.ceil(0.975 * (resamples - 1))]


@dataclass
class Champion:
    policy: str
    round: int
    accuracy: float | None  # the test split's mean score (reported, never decided on)
    mean_tokens: float  # on the validation split
    guards: dict[str, float] = field(default_factory=dict)  # guard suite → accuracy
    validation: float | None = None  # exact match on the validation split: what the gate compares
    # the starting model's (round 0's) guard accuracies, which guards are held to; empty: `guards`
    baseline_guards: dict[str, float] = field(default_factory=dict)
    # validation exact match per curriculum level ("0", "1", …; task.curriculum): where the next round trains
    levels: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def of(cls, policy: str, round_: int, metrics: dict, start: dict | None = None) -> Champion:
        """The champion from its round's metrics; `start`: round 0's metrics (the guards' baseline)."""
        return cls(
            policy,
            round_,
            metrics["accuracy"],
            metrics.get("validation_mean_response_tokens", metrics["mean_response_tokens"]),
            guard_scores(metrics),
            metrics.get("validation_exact_match"),
            guard_scores(start if start is not None else metrics),
            {k.removeprefix(LEVEL_VALIDATION): v for k, v in metrics.items() if k.startswith(LEVEL_VALIDATION)},
        )

    def level_scores(self) -> dict[int, float | None]:
        return {int(k): v for k, v in self.levels.items()}


LEVEL_VALIDATION = "level_validation_exact_match."  # a curriculum level's validation exact match, by level


def guard_scores(metrics: dict) -> dict[str, float]:
    return {k.removeprefix("guard_accuracy."): v for k, v in metrics.items() if k.startswith("guard_accuracy.")}


def decide(metrics: dict, champion: Champion, cfg: PromotionConfig, trained: bool) -> tuple[bool, list[str]]:
    """(promoted, reasons): the reasons say which checks failed, or that all passed."""
    if not trained:
        return False, ["no model was trained (no training data this round)"]
    failed: list[str] = []
    passed: list[str] = []
    acc = metrics.get("validation_exact_match")
    if acc is None or champion.validation is None:
        passed.append("validation exact match not measured: the validation split has no reference answers (unscored)")
    elif cfg.rule == "interval" and metrics.get("validation_exact_match_gain_low") is not None:
        gain = metrics["validation_exact_match_gain"]
        low, high = metrics["validation_exact_match_gain_low"], metrics["validation_exact_match_gain_high"]
        line = (
            f"validation exact match {acc:.1%} vs champion (round {champion.round}) {champion.validation:.1%}: "
            f"{gain * 100:+.1f} points, 95% interval [{low * 100:+.1f}, {high * 100:+.1f}] (paired bootstrap); "
            f"its lower bound needs ≥ {cfg.min_improvement * 100:+.1f}"
        )
        (passed if low >= cfg.min_improvement - 1e-12 else failed).append(line)
    else:
        gain = acc - champion.validation
        line = (
            f"validation exact match {acc:.1%} vs champion (round {champion.round}) {champion.validation:.1%}: "
            f"{gain * 100:+.1f} points, needs ≥ {cfg.min_improvement * 100:+.1f}"
        )
        (passed if gain >= cfg.min_improvement - 1e-12 else failed).append(line)
    length = metrics.get("validation_mean_response_tokens", metrics["mean_response_tokens"])
    if cfg.max_length_growth is not None and champion.mean_tokens > 0:
        growth, extra = length / champion.mean_tokens - 1, length - champion.mean_tokens
        line = (
            f"mean length {length:.1f} vs {champion.mean_tokens:.1f} tokens: "
            f"{growth:+.0%} ({extra:+.1f} tokens), limit +{cfg.max_length_growth:.0%} or "
            f"+{cfg.length_slack_tokens:g} tokens"
        )
        ok = growth <= cfg.max_length_growth + 1e-12 or extra <= cfg.length_slack_tokens + 1e-9
        (passed if ok else failed).append(line)
    for name, max_drop in metrics.get("guard_limits", {}).items():
        now, before = (
            metrics.get(f"guard_accuracy.{name}"),
            champion.baseline_guards.get(name, champion.guards.get(name)),
        )
        if now is None or before is None:
            continue
        line = f"guard {name} {now:.1%} vs the starting model's {before:.1%}: {(now - before) * 100:+.1f} points"
        low, high = (metrics.get(f"guard_change.{name}.accuracy_gain_{end}") for end in ("low", "high"))
        if low is not None and high is not None:
            line += f", 95% interval [{low * 100:+.1f}, {high * 100:+.1f}]"
        line += f", limit −{max_drop * 100:.1f}"
        beyond = before - now > max_drop + 1e-12
        if beyond and cfg.guard_rule == "significant" and high is not None and high >= 0:
            line += " (within noise: its interval reaches 0)"
            beyond = False
        (failed if beyond else passed).append(line)
    return (not failed), (failed or passed)


def paired_gains(
    new_rows: Sequence[dict], old_rows: Sequence[dict], seed: int = 0, suite: str | None = None, prefix: str = ""
) -> dict[str, float]:
    """The round's benchmark rows vs the champion's, joined on item (of `suite`, when given): mean-score
    gain and exact-match gain, each with its paired-bootstrap 95% interval, keys prefixed with
    `prefix`. Items either left unscored drop out."""
    if suite is not None:
        new_rows = [r for r in new_rows if r["suite"] == suite]
        old_rows = [r for r in old_rows if r["suite"] == suite]
    old = {r["item_id"]: r["score"] for r in old_rows if r["score"] is not None}
    pairs = [(r["score"], old[r["item_id"]]) for r in new_rows if r["score"] is not None and r["item_id"] in old]
    out: dict[str, float] = {}
    if not pairs:
        return out
    for name, f in (("accuracy", lambda x: x), ("exact_match", lambda x: float(exactly_correct(x)))):
        gain = paired_bootstrap([f(a) for a, _ in pairs], [f(b) for _, b in pairs], seed=seed)
        assert gain is not None  # pairs is not empty
        out |= {
            f"{prefix}{name}_gain": gain[0],
            f"{prefix}{name}_gain_low": gain[1],
            f"{prefix}{name}_gain_high": gain[2],
        }
    out[f"{prefix}paired_items"] = len(pairs)
    return out
