"""pyarrow schemas, one per table. Every file carries its own `run_id` and `round` columns
(and also sits under hive-style `run_id=…/round=…` folders), so a file read alone is complete."""

from __future__ import annotations

import pyarrow as pa

_KEY = [pa.field("run_id", pa.string(), nullable=False), pa.field("round", pa.int32(), nullable=False)]

PROMPTS = pa.schema(
    _KEY
    + [
        pa.field("prompt_id", pa.string(), nullable=False),  # sha256 of the prompt text
        # "train" | "validation" | "test" | "transfer:<name>" (benchmark.transfer) | "decontaminated" (drawn
        # for training, dropped as overlapping an evaluation item)
        pa.field("split", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),  # task/difficulty, for balance and the data card
        pa.field("seed", pa.int64()),  # generator seed of the item (reasoning-gym), null for files
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("answer", pa.string()),  # reference answer, nullable
        pa.field("metadata", pa.string()),  # JSON
    ]
)

CANDIDATES = pa.schema(
    _KEY
    + [
        pa.field("candidate_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("policy", pa.string(), nullable=False),  # checkpoint ref
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),  # the sample's own seed: from (round seed, prompt, index)
        pa.field("response", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" | "length"
        pa.field("mean_logprob", pa.float64()),  # mean log-prob of the sampled tokens under the policy
        pa.field("self_certainty", pa.float64()),  # mean per-token KL(uniform || policy), from generation
        pa.field("sampling", pa.string(), nullable=False),  # JSON of the sampling parameters
    ]
)

JUDGMENTS = pa.schema(
    _KEY
    + [
        pa.field("candidate_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # the reward source's name (judge.sources)
        pa.field("spec_hash", pa.string(), nullable=False),  # hash of the source's spec (e.g. rubric template)
        pa.field("score", pa.float64()),  # NULL when the judge's output did not parse
        pa.field("parse_ok", pa.bool_(), nullable=False),
        pa.field("raw", pa.string()),  # judge text / extracted answer
        pa.field("details", pa.string()),  # JSON
    ]
)

PAIRS = pa.schema(
    _KEY
    + [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("chosen_score", pa.float64(), nullable=False),
        pa.field("rejected_score", pa.float64(), nullable=False),
        pa.field("margin", pa.float64(), nullable=False),
        pa.field("rule", pa.string(), nullable=False),
        pa.field("reward", pa.string(), nullable=False),
        pa.field("chosen_id", pa.string(), nullable=False),
        pa.field("rejected_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("chosen_tokens", pa.int32(), nullable=False),
        pa.field("rejected_tokens", pa.int32(), nullable=False),
        # CREAM: Kendall τ of the prompt's candidates ranked by this round's and the previous round's judge
        pa.field("cream_tau", pa.float64()),
    ]
)

# One judge-health figure of one reward source in one round (tasks/judge.py documents each metric).
JUDGE_HEALTH = pa.schema(
    _KEY
    + [
        pa.field("source", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        # the model that judged (engine:ref, an endpoint's credentials masked) and how its verdicts
        # were read: distribution, top_logprobs_<k>, sampled_<k>, sequence_logprobs; NULL for model-free sources
        pa.field("model", pa.string()),
        pa.field("method", pa.string()),
    ]
)

# The SFT set (STaR / rejection sampling): each prompt's best sample above a threshold.
SFT = pa.schema(
    _KEY
    + [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("completion", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("reward", pa.string(), nullable=False),
        pa.field("candidate_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
    ]
)

BENCHMARKS = pa.schema(
    _KEY
    + [
        pa.field("model", pa.string(), nullable=False),
        pa.field("suite", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("extracted", pa.string()),
        pa.field("score", pa.float64()),  # NULL: the item has no reference answer (unscored, never 0)
        pa.field("n_tokens", pa.int32(), nullable=False),
    ]
)

ROUNDS = pa.schema(
    _KEY
    + [
        pa.field("status", pa.string(), nullable=False),  # "completed" | "failed"
        pa.field("policy_in", pa.string(), nullable=False),
        pa.field("policy_out", pa.string()),
        pa.field("weights_sha256", pa.string()),  # sha256 of policy_out's weight files: benchmarked = registered
        pa.field("reference_model", pa.string()),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("judge_template_hash", pa.string()),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("code_version", pa.string(), nullable=False),
        pa.field("package_versions", pa.string(), nullable=False),  # JSON
        pa.field("mlflow_run_id", pa.string()),
        pa.field("registered_version", pa.string()),
        pa.field("promoted", pa.bool_(), nullable=False),
        pa.field("promotion_reasons", pa.string()),  # the promotion gate's checks, "; "-separated
        pa.field("accuracy", pa.float64()),
        pa.field("n_pairs", pa.int32()),
        pa.field("curriculum_level", pa.int32()),  # the level the round trained at (task.curriculum); null: none
        pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("error", pa.string()),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "candidates": CANDIDATES,
    "judgments": JUDGMENTS,
    "judge_health": JUDGE_HEALTH,
    "pairs": PAIRS,
    "sft": SFT,
    "benchmarks": BENCHMARKS,
    "rounds": ROUNDS,
}
