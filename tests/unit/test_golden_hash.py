"""Golden hashes: the config hash and every source's spec hash, pinned. They key every stage's
manifest and every judgments row, so a refactor that changes one would make resumed runs redo
their work and split one source's history in two. A change here must be a change in meaning."""

from pathlib import Path

import pytest

from flywheel import config as C
from flywheel.models import rewards

ROOT = Path(__file__).resolve().parents[2]

EVERY_SOURCE = {
    "judge": {
        "sources": [
            {"type": "verifier", "match": "numeric", "tolerance": 0.01},
            {"type": "verifier", "name": "rx", "match": "regex", "pattern": "{answer}"},
            {"type": "verifier", "name": "fn", "match": "callable", "callable": "json:dumps"},
            {"type": "llm_judge", "samples": 3, "previous": True},
            {"type": "pairwise_judge", "opponents": 2},
            {"type": "majority_vote", "min_vote_share": 0.25},
            "self_certainty",
            {"type": "implicit_reward", "beta": 0.2},
        ]
    }
}

CASES = {
    "default": ({}, "adb79cd814902004", {"verifier": "e92ac70de919a656", "llm_judge": "6479a880241e2915"}),
    "label_free": (
        "label_free",
        "39fecf79ae9a3d2c",
        {"majority_vote": "0aaff4b01e4ec0ff", "self_certainty": "4e00d85e3f527f5e"},
    ),
    "star": ("star", "34f43d0d494b1bfa", {"verifier": "e92ac70de919a656", "llm_judge": "6479a880241e2915"}),
    "every_source": (
        EVERY_SOURCE,
        "9beedc05785445e2",
        {
            "verifier": "9b3e1d66b77adf89",
            "rx": "0afe83341742e074",
            "fn": "e0deea64f7bcb069",
            "majority_vote": "175a2b8e6072a48a",
            "self_certainty": "4e00d85e3f527f5e",
            "llm_judge": "baa549d251cb47f7",
            "pairwise_judge": "5f2bf15813caca95",
            "implicit_reward": "e693ca7257e22166",
            "llm_judge@previous": "baa549d251cb47f7",
        },
    ),
    "prompts_file": (
        {"task": {"prompts_file": "configs/default.yaml", "prompts_per_round": 8, "instruction": "Answer:"}},
        "384e7a75f8be5170",
        {"verifier": "e92ac70de919a656", "llm_judge": "6479a880241e2915"},
    ),
}


def _config(data) -> C.FlywheelConfig:
    if isinstance(data, str):
        data = C._read_yaml(ROOT / "configs" / f"{data}.yaml")
    return C.FlywheelConfig.model_validate(data)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_hash_is_pinned(case):
    data, config_hash, _ = CASES[case]
    assert _config(data).hash() == config_hash


@pytest.mark.parametrize("case", sorted(CASES))
def test_spec_hashes_are_pinned(case):
    data, _, spec_hashes = CASES[case]
    got = {s.name: s.spec_hash for s in rewards.build(_config(data).judge, None)}
    assert got == spec_hashes


def test_each_field_enters_the_hash_as_it_declares():
    def h(changes, base=None):
        return C.load_config(None, C.deep_merge(base or {}, changes)).hash()

    plain = h({})
    # NOT_HASHED: how fast, where, or how much of the work runs
    for changes in (
        {"rounds": 7},
        {"workspace": "elsewhere"},
        {"judge": {"batch_size": 3}},
        {"promotion": {"stop_after": 2}},
        {"stages": {"checkpoint_steps": 9}},
    ):
        assert h(changes) == plain, changes
    sharded = {"sampling": {"shards": 2}}
    assert h({"model": {"workers": 2}}, sharded) == h(sharded)
    # HASHED_UNLESS_DEFAULT: left out at the default, hashed when set away from it
    transfer = [{"name": "three_terms", "options": {"min_terms": 3, "max_terms": 3}}]
    for changes in (
        {"sampling": {"shards": 2}},
        {"promotion": {"rule": "interval"}},
        {"promotion": {"length_slack_tokens": 0}},
        {"benchmark": {"transfer": transfer}},
    ):
        assert h(changes) != plain, changes
    assert h({"promotion": {"rule": "point"}}) == h({"benchmark": {"transfer": []}}) == plain
    assert h({"promotion": {"length_slack_tokens": 16}}) == plain
    # everything else is hashed
    for changes in ({"seed": 1}, {"judge": {"max_prompt_tokens": 512}}, {"train": {"dpo": {"beta": 0.2}}}):
        assert h(changes) != plain, changes
