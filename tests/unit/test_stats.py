"""Intervals on hand-made cases, and the promotion gate's interval rule."""

from __future__ import annotations

import pytest

from flywheel.config import PromotionConfig
from flywheel.tasks import promote
from flywheel.tasks.benchmark import summarize


def test_wilson_interval_matches_the_formula_on_known_cases():
    # 5 of 10: the textbook Wilson interval [0.2366, 0.7634]
    assert promote.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = promote.wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)  # never a [0, 0] interval at 0 successes
    lo, hi = promote.wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-4)
    assert promote.wilson_interval(0, 0) is None


def test_paired_bootstrap_on_hand_made_cases():
    same = [0.0, 1.0, 0.5, 1.0]
    assert promote.paired_bootstrap(same, same) == (0.0, 0.0, 0.0)
    assert promote.paired_bootstrap([1.0] * 8, [0.0] * 8) == (1.0, 1.0, 1.0)  # every item gains 1
    # 6 items gain 1, 4 lose 1: mean +0.2, but the interval spans 0 (it could be noise)
    new, old = [1.0] * 6 + [0.0] * 4, [0.0] * 6 + [1.0] * 4
    gain, low, high = promote.paired_bootstrap(new, old, seed=3)
    assert gain == pytest.approx(0.2) and low < 0 < high
    assert promote.paired_bootstrap(new, old, seed=3) == (gain, low, high)  # seeded
    # 60 of 100 items gain, 10 lose: clearly above 0
    gain, low, high = promote.paired_bootstrap([1.0] * 60 + [0.0] * 40, [0.0] * 60 + [1.0] * 10 + [0.0] * 30)
    assert gain == pytest.approx(0.5) and 0.35 < low < 0.5 < high < 0.65
    with pytest.raises(ValueError, match="same items"):
        promote.paired_bootstrap([1.0], [1.0, 0.0])


def test_paired_gains_join_on_items_and_drop_unscored():
    old = [{"item_id": i, "score": s} for i, s in (("a", 0.0), ("b", 1.0), ("c", 0.5), ("d", None))]
    new = [{"item_id": i, "score": s} for i, s in (("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", 1.0), ("e", 1.0))]
    g = promote.paired_gains(new, old)
    assert g["paired_items"] == 3  # d unscored before, e not in the champion's suite
    assert g["accuracy_gain"] == pytest.approx(0.5)  # (1 + 0 + 0.5) / 3
    assert g["exact_match_gain"] == pytest.approx(2 / 3)  # a and c become exact; 0.5 was partial credit
    # one split at a time: the validation split's items never mix into the test split's gain
    tagged_old = [dict(r, suite="t") for r in old] + [{"item_id": "v", "score": 1.0, "suite": "v"}]
    tagged_new = [dict(r, suite="t") for r in new] + [{"item_id": "v", "score": 0.0, "suite": "v"}]
    assert promote.paired_gains(tagged_new, tagged_old, suite="t")["accuracy_gain"] == pytest.approx(0.5)
    v = promote.paired_gains(tagged_new, tagged_old, suite="v", prefix="validation_")
    assert v["validation_accuracy_gain"] == -1.0 and v["validation_paired_items"] == 1


def test_exact_match_is_full_credit_only():
    rows = [{"score": s, "n_tokens": 4} for s in (1.0, 0.5, 0.0, 1.0, None)]
    m = summarize(rows)
    assert m["accuracy"] == pytest.approx(2.5 / 4) and m["exact_match"] == pytest.approx(0.5)
    assert m["exact_match_low"] < 0.5 < m["exact_match_high"]


def _decide(rule: str, gain: tuple[float, float, float]) -> tuple[bool, list[str]]:
    champion = promote.Champion("c", 0, 0.40, 10.0, validation=0.40)
    metrics = {
        "accuracy": 0.40,
        "mean_response_tokens": 10.0,
        "validation_exact_match": 0.40 + gain[0],
        "validation_exact_match_gain": gain[0],
        "validation_exact_match_gain_low": gain[1],
        "validation_exact_match_gain_high": gain[2],
    }
    return promote.decide(metrics, champion, PromotionConfig(rule=rule, min_improvement=0.0), trained=True)


def test_interval_rule_refuses_a_gain_within_noise():
    noisy = (0.05, -0.02, 0.12)
    assert _decide("point", noisy)[0]
    ok, reasons = _decide("interval", noisy)
    assert not ok and "95% interval [-2.0, +12.0]" in reasons[0] and "lower bound needs ≥ +0.0" in reasons[0]
    assert _decide("interval", (0.08, 0.03, 0.13))[0]
