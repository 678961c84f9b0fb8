"""sampling.hint (STaR's rationalization): the settings it refuses, its seeds, and its place in the hash.
The hinted pass itself runs on the real model in tests/integration/test_hint.py."""

import pytest

from flywheel import seeds
from flywheel.config import ConfigError, load_config


@pytest.mark.parametrize(
    "hint, more, message",
    [
        ({"template": "{prompt} (no answer here)"}, {}, r"sampling\.hint\.template must contain \{answer\}"),
        ({"template": "the answer is {answer}"}, {}, r"must contain \{prompt\}"),
        ({"template": "{prompt} {answer} {extra}"}, {}, r"only \{prompt\} and \{answer\} are filled in"),
        ({"samples": 0}, {}, r"sampling\.hint\.samples"),
        ({}, {"preset": "label_free"}, "it needs a verifier among judge.sources"),
    ],
)
def test_impossible_hints_are_one_line_errors(hint, more, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, {"sampling": {"hint": hint}}, **more)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "other, message",
    [
        ("majority_vote", "would count their votes"),
        ("self_certainty", "would score their certainty with the answer in view"),
    ],
)
def test_a_hint_beside_a_source_the_answer_would_sway_is_refused(other, message):
    sources = [{"type": "verifier"}, {"type": other}]
    with pytest.raises(ConfigError, match=f"a {other} source {message}"):
        load_config(None, {"sampling": {"hint": {}}, "judge": {"sources": sources}})


def test_only_prompts_with_an_answer_and_n_wrong_samples_are_hinted():
    from flywheel.models.tasks import Item
    from flywheel.tasks.generate import hint_targets

    items = [Item(f"{i} + 1 =", None if i == 3 else str(i + 1), "t") for i in range(5)]
    right = [
        [False] * 4,  # all wrong: hinted
        [False, True, False, False],  # one right: a pair forms without a hint
        [False, False],  # a frontier's probe only, never topped up: not hinted
        [False] * 4,  # no reference answer to give
        [False] * 4,
    ]
    assert hint_targets(items, right, 4) == [0, 4]


def test_the_hint_enters_the_hash_only_when_set():
    plain = load_config(None, {}).hash()
    assert load_config(None, {"sampling": {"hint": None}}).hash() == plain
    hinted = load_config(None, {"sampling": {"hint": {}}})
    assert hinted.hash() != plain
    assert load_config(None, {"sampling": {"hint": {"samples": 2}}}).hash() != hinted.hash()
    assert hinted.sampling.hint.template.format(prompt="1 + 1 =", answer="2").startswith("1 + 1 =\n\nThe answer is 2.")
    assert load_config(None, {"sampling": {"hint": {"require_work": False}}}).hash() != hinted.hash()


@pytest.mark.parametrize(
    "prompt, answer, response, shows",
    [
        ("What is 0 - 4 =", "-4", "The answer is -4.", False),  # the answer alone
        ("What is 0 - 4 =", "-4", "0 - 4 = -4", True),
        ("What is 0 - 4 =", "-4", "Subtract 4 from 0: -4.", True),
        ("What is 0 - 4 =", "-4", "Subtract 4 from zero: -4.", False),  # numbers in words are not read
        ("What is 8 - 4 =", "4", "The answer is 4.", False),  # the prompt's 4 is the answer: not work
        ("What is 8 - 4 =", "4", "8 minus 4 leaves 4", True),
        ("What is 12 + 1,300 =", "1312", "1300 + 12 = 1,312", True),  # separators and order do not matter
        ("What is 12 + 30 =", "42", "The answer is 42, not 12.3", False),  # 12.3 is not 12
        ("What is 2 + 2 =", "4", "The answer is -2 + 6 = 4", True),  # a sign is not part of the number
        ("Spell 'cat' backwards.", "tac", "tac", True),  # no number to look for: not judged
    ],
)
def test_a_response_shows_its_work_when_it_uses_the_prompts_numbers_beside_the_answer(prompt, answer, response, shows):
    from flywheel.models.tasks import Item, Task

    assert Task().shows_work(response, Item(prompt, answer, "t")) is shows


def test_hinted_samples_have_seeds_of_their_own():
    stage = seeds.stage(0, 1)
    assert len({seeds.hint(stage), seeds.top_up(stage), stage}) == 3
    assert seeds.hint(stage) != seeds.hint(seeds.stage(0, 2))
