"""sampling.hint (STaR's rationalization): the settings it refuses, its seeds, its place in the hash, and
which hinted samples it keeps (on a scripted engine registered as a plugin would register one). The
hinted pass itself runs on the real model in tests/integration/test_hint.py."""

import json
import re

import pytest

from flywheel import seeds
from flywheel.config import ConfigError, load_config
from flywheel.models import engines
from flywheel.models.engines import Engine, Generation


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
    assert hinted.sampling.hint.template.format(prompt="1 + 1 =", answer="2") == (
        "1 + 1 =\n\nThe answer is 2. Write out the calculation step by step, ending with 2."
    )
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
        ("What is 2 + 45 =", "47", "Step 1: add.\nStep 2: The answer is 47.", False),  # step numbers are not work
        ("What is 2 + 45 =", "47", "1. Add them.\n2) The answer is 47.", False),  # nor are list markers
        ("What is 2 + 45 =", "47", "x2 gives 47", False),  # a number inside a word is not read
        ("What is 2 + 45 =", "47", "Step 1: 2 + 45 = 47", True),
        ("Spell 'cat' backwards.", "tac", "tac", True),  # no number to look for: not judged
        ("Name the 3rd planet.", "Earth", "Earth", True),  # the answer is not a number: not judged
        ("What is 2 + 2 =", "", "4", True),  # no reference answer: not judged
    ],
)
def test_a_response_shows_its_work_when_it_uses_the_prompts_numbers_beside_the_answer(prompt, answer, response, shows):
    from flywheel.models.tasks import Item, Task

    assert Task().shows_work(response, Item(prompt, answer, "t")) is shows


def test_hinted_samples_have_seeds_of_their_own():
    stage = seeds.stage(0, 1)
    assert len({seeds.hint(stage), seeds.top_up(stage), stage}) == 3
    assert seeds.hint(stage) != seeds.hint(seeds.stage(0, 2))


class Scripted(Engine):
    """Wrong on every prompt asked plainly; on a hinted prompt, its k samples are: the answer alone
    (right), the calculation (right), the calculation (wrong)."""

    name = "scripted"

    def sample(self, prompts, *, n, progress=None, **_):
        out = []
        for p in prompts:
            hint = re.search(r"The answer is (-?\d+)\. Write", p)
            if hint is None:
                answers = ["999 is the answer."] * n
            else:
                a = hint.group(1)  # a number of the problem's other than the answer: the work
                first = next(x for x in re.findall(r"\d+", p.split("problem:")[-1]) if x != a.lstrip("-"))
                answers = [f"The answer is {a}.", f"{first} and the rest make {a}", f"{first} makes {int(a) + 1}"]
            out += [Generation(r, 8, "stop", None, None) for r in answers[:n]]
            if progress:
                progress(n)
        return out


@pytest.fixture
def scripted():
    from flywheel.models.engines import Backend, Settings, registry

    registry.register(Backend("scripted", factory=lambda cfg, ref: Scripted(ref), settings=Settings))
    yield
    engines.release()
    registry.unregister("scripted")


@pytest.mark.parametrize("require_work", [True, False])
def test_hinted_samples_that_give_the_answer_alone_are_dropped_and_counted(scripted, tmp_path, require_work):
    from flywheel.models.tasks.splits import make_source
    from flywheel.storage import catalog
    from flywheel.tasks.common import StageContext
    from flywheel.tasks.generate import generate_task

    config = load_config(
        None,
        {
            "workspace": str(tmp_path),
            "model": {"engine": "scripted"},
            "sampling": {"n": 2, "hint": {"samples": 3, "require_work": require_work}},
        },
    )
    source = make_source(config.task)
    items = source.items(7, 4)
    metrics = generate_task.fn(StageContext(config, "r", 1), items, "policy", source=source)
    rows = catalog.query(tmp_path, "SELECT prompt_id, sample_index, response FROM candidates").to_pylist()
    meta = catalog.query(tmp_path, "SELECT prompt_id, metadata FROM prompts WHERE split = 'train'").to_pylist()
    kept = [1, 2] if require_work else [0, 1, 2]
    for it in items:
        mine = sorted((r for r in rows if r["prompt_id"] == it.id), key=lambda r: r["sample_index"])
        assert [r["sample_index"] for r in mine] == [0, 1] + [2 + k for k in kept]
        assert all(not r["response"].startswith("The answer is") for r in mine) or not require_work
        record = json.loads(next(m["metadata"] for m in meta if m["prompt_id"] == it.id))["hint"]
        assert record == {"samples": 3, "kept": len(kept), "right": len(kept) - 1}
    assert metrics["hint_prompts"] == metrics["hint_prompts_right"] == 4
    assert metrics["hint_samples"] == 4 * len(kept) and metrics["candidates"] == 4 * (2 + len(kept))
    assert metrics["hint_samples_answer_only"] == (4 if require_work else 0)
