"""The promotion gate: does a round's model become the champion the next round starts from?

It must beat the champion's held-out accuracy by `min_improvement`, its mean response length may
grow at most `max_length_growth`, and no guard (out-of-domain) suite may drop more than its
`max_drop`. Every check's outcome is a reason, recorded in the rounds table and in MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.config import PromotionConfig


@dataclass
class Champion:
    policy: str
    round: int
    accuracy: float | None
    mean_tokens: float
    guards: dict[str, float] = field(default_factory=dict)  # guard suite → accuracy

    @classmethod
    def of(cls, policy: str, round_: int, metrics: dict) -> Champion:
        return cls(policy, round_, metrics["accuracy"], metrics["mean_response_tokens"],
                   {k.removeprefix("guard_accuracy."): v for k, v in metrics.items()
                    if k.startswith("guard_accuracy.")})


def decide(metrics: dict, champion: Champion, cfg: PromotionConfig, trained: bool) -> tuple[bool, list[str]]:
    """(promoted, reasons): the reasons say which checks failed, or that all passed."""
    if not trained:
        return False, ["no model was trained (no training data this round)"]
    failed, passed = [], []
    acc = metrics["accuracy"]
    if acc is None or champion.accuracy is None:
        passed.append("accuracy not measured: the held-out suite has no reference answers (unscored)")
    else:
        gain = acc - champion.accuracy
        line = (f"accuracy {acc:.1%} vs champion (round {champion.round}) {champion.accuracy:.1%}: "
                f"{gain * 100:+.1f} points, needs ≥ {cfg.min_improvement * 100:+.1f}")
        (passed if gain >= cfg.min_improvement - 1e-12 else failed).append(line)
    if cfg.max_length_growth is not None and champion.mean_tokens > 0:
        growth = metrics["mean_response_tokens"] / champion.mean_tokens - 1
        line = (f"mean length {metrics['mean_response_tokens']:.1f} vs {champion.mean_tokens:.1f} tokens: "
                f"{growth:+.0%}, limit +{cfg.max_length_growth:.0%}")
        (passed if growth <= cfg.max_length_growth + 1e-12 else failed).append(line)
    for name, max_drop in metrics.get("guard_limits", {}).items():
        now, before = metrics.get(f"guard_accuracy.{name}"), champion.guards.get(name)
        if now is None or before is None:
            continue
        line = f"guard {name} {now:.1%} vs {before:.1%}: {(now - before) * 100:+.1f} points, limit −{max_drop * 100:.1f}"
        (passed if before - now <= max_drop + 1e-12 else failed).append(line)
    return (not failed), (failed or passed)
