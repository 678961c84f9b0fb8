"""The registrations of the judge, curate and benchmark stages (generate, train and promote register
in their own modules)."""

from flywheel.tasks import benchmark, curate, judge
from flywheel.tasks.common import short_hash
from flywheel.tasks.stage import RoundState, Stage, register


def _previous(s: RoundState) -> str | None:
    """CREAM's second ranking: the policy the previous round started from, if it differs."""
    return s.previous if s.previous != s.policy else None


register(Stage("judge", 20, judge.judge_task,
               fingerprint=lambda fp, s: short_hash("judge", fp, _previous(s), s.reference),
               args=lambda ctx, prepared, params, fp: (params["policy"], params.get("previous"),
                                                       params.get("reference")),
               params=lambda s: {"policy": s.policy, "previous": _previous(s), "reference": s.reference},
               outputs=(("judgments", "*"), ("judge_health", "*"))))
register(Stage("curate", 30, curate.curate_task, fingerprint=lambda fp, s: short_hash("curate", fp),
               outputs=(("pairs", "*"), ("sft", "*"))))
register(Stage("benchmark", 50, benchmark.benchmark_task,
               # round 0 benchmarks the starting model with no stage before it
               fingerprint=lambda fp, s: (short_hash("benchmark", fp) if fp is not None
                                          else short_hash("benchmark", s.config.hash(), s.round, s.policy)),
               args=lambda ctx, prepared, params, fp: (prepared.validation, prepared.test, params["policy"]),
               params=lambda s: {"policy": s.policy_out or s.policy},
               outputs=(("benchmarks", "*"),), baseline=True))
