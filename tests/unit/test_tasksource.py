import json

import pytest

from flywheel.config import TaskConfig
from flywheel.errors import TaskError
from flywheel.models.tasks.decontam import Decontaminator
from flywheel.models.tasks.prompts_file import FileSource
from flywheel.models.tasks.reasoning_gym import ReasoningGymSource
from flywheel.models.tasks.splits import benchmark_items, make_source, train_items

EASY = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def test_reasoning_gym_items_and_verifier():
    src = ReasoningGymSource("chain_sum", EASY)
    items = src.items(seed=5, size=4)
    assert len(items) == 4 and all(it.answer is not None for it in items)
    it = items[0]
    assert src.score(it.answer, it.answer, it.metadata) == 1.0
    assert src.score(str(int(it.answer) + 1), it.answer, it.metadata) == 0.0
    assert items == src.items(seed=5, size=4), "same seed, same items"


def test_unknown_task_and_bad_options():
    with pytest.raises(TaskError, match="unknown reasoning-gym task 'no_such_task'"):
        ReasoningGymSource("no_such_task", {})
    with pytest.raises(TaskError, match="bad options"):
        ReasoningGymSource("chain_sum", {"min_terms": 3, "max_terms": 1})
    with pytest.raises(TaskError, match="bad options"):
        ReasoningGymSource("chain_sum", {"no_such_option": 1})


WIDER = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}  # the default task's space


def _splits(src, v=100, t=200):
    from flywheel.models.tasks.splits import eval_items

    validation, test = eval_items(src, v, t, seed=0)
    held = validation + test
    return validation, test, Decontaminator([it.prompt for it in held], metadata=[it.metadata for it in held])


def test_splits_and_rounds_are_disjoint_beyond_exact_text():
    from flywheel.models.tasks.decontam import normal_forms

    src = ReasoningGymSource("chain_sum", WIDER)
    validation, test, decontam = _splits(src)
    assert (len(validation), len(test)) == (100, 200)

    def forms(items):
        return {f for it in items for f in normal_forms(it.prompt, it.metadata) if not f.startswith("text:")}

    assert len(forms(validation + test)) == 300, "drawn without replacement: no item twice, in any form"
    assert not forms(validation) & forms(test)
    seen: set[str] = set()
    for r in (1, 2, 3):
        draw = train_items(src, r, 64, 0, decontam)
        assert len(draw.items) == 64 and len({it.id for it in draw.items}) == 64
        assert not forms(draw.items) & forms(validation + test), "a training prompt is an evaluation item"
        assert not forms(draw.items) & seen, f"round {r} reuses a prompt of an earlier round"
        seen |= forms(draw.items)
        assert draw.removed and {o.rule for _, o in draw.removed} <= {"exact", "normalised", "ngram"}
        assert draw == train_items(src, r, 64, 0, decontam), "the draw is a function of seed and round"
    assert draw.repeats > 0, "the space is small enough that later rounds meet earlier prompts and skip them"
    assert {it.category for it in draw.items} == {"chain_sum"}  # no category fields asked for


def test_a_commuted_sum_is_the_same_item():
    from flywheel.models.tasks.decontam import normal_forms

    a = "State the final answer to the following arithmetic problem: 13 + 5 ="
    b = "State the final answer to the following arithmetic problem: 5 + 13 ="
    c = "State the final answer to the following arithmetic problem: 13 - 5 ="
    assert normal_forms(a) & normal_forms(b) and not normal_forms(a) & normal_forms(c)
    d = Decontaminator(
        [a]
        + [
            f"State the final answer to the following arithmetic problem: {x} - {y} ="
            for x in range(5)
            for y in range(4)
        ]
    )
    assert d.contaminated(b).rule == "normalised" and d.contaminated(c) is None
    assert d.contaminated("What is 5 + 13?").rule == "normalised"  # the same sum in other words


def test_the_ngram_rule_fires_on_short_prompts():
    """n scales with the prompt: a 12-word question with one word changed shares most of its 4-grams,
    which 8-grams (at most 5 per prompt, all touching the change) would miss."""
    items = [
        "Which planet in our solar system has the largest number of moons today",
        "Name the river that flows through the city of Paris in France",
    ] + [f"Question {i}: give a synonym of the word number {i} in the list" for i in range(20)]
    d = Decontaminator(items, n=8, threshold=0.5)
    hit = d.contaminated("Which planet in our solar system has the greatest number of moons today")
    assert hit is not None and hit.rule == "ngram" and hit.item == 0
    assert d.contaminated("Which river flows through the city of London in England") is None


def test_decontamination_catches_a_planted_overlap_and_spares_neighbours():
    bench = [
        "State the final answer to the following arithmetic problem: 3 + 5 =",
        "Explain in detail why the sky appears blue during the day but red at sunset.",
    ] + [f"State the final answer to the following arithmetic problem: {a} + {b} =" for a in range(5) for b in range(4)]
    d = Decontaminator(bench, n=8, threshold=0.7)
    planted = "Here is a question for you. " + bench[1] + " Answer in one paragraph, please."
    assert d.contaminated(planted).item == 1
    assert d.contaminated("explain in detail why the SKY appears blue during the day but red at sunset!").item == 1
    assert d.contaminated(bench[0]).share == 1.0
    # same template, another question: the template is boilerplate, the question differs
    assert d.contaminated("State the final answer to the following arithmetic problem: 7 + 9 =") is None
    assert d.contaminated("Why is grass green?") is None


def test_categories_from_item_fields(tmp_path):
    src = ReasoningGymSource("chain_sum", {**EASY, "max_terms": 3}, category_fields=["num_terms", "nope"])
    cats = {it.category for it in src.items(0, 40)}
    assert cats == {"chain_sum/num_terms=2", "chain_sum/num_terms=3"}
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "topic": "x"}) + "\n" + json.dumps({"prompt": "b"}))
    assert [it.category for it in FileSource(f, category_fields=["topic"]).items(0, 2)] == ["p/topic=x", "p"]


def test_file_source_jsonl_and_parquet(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"What is {i}+1?", "answer": str(i + 1)}) for i in range(10)))
    src = make_source(TaskConfig(prompts_file=f))
    bench = benchmark_items(src, 200, 0)
    assert 1 <= len(bench) <= 2  # at most a fifth is held out
    train = train_items(src, 1, 100, 0, Decontaminator([it.prompt for it in bench])).items
    assert len(train) == 10 - len(bench)
    assert src.score("2", "2", {}) == 1.0 and src.score("3", "2", {}) == 0.0 and src.score("x", None, {}) is None
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a?", "b?"]}), pf)
    assert [it.prompt for it in FileSource(pf).items(0, 2)] == ["a?", "b?"]


def test_missing_prompt_file(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        FileSource(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "has no prompts"),
        (b'{"prompt": "ok"}\n{"prompt": "broken"\n', r"p.jsonl:2: malformed JSON"),
        (b'{"prompt": "ok"}\n\n{"answer": "1"}\n', r"p.jsonl:3: missing or empty 'prompt'"),
        (b'["a list"]\n', r"p.jsonl:1: expected a JSON object"),
        (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', r"p.jsonl:2: not UTF-8 text \(byte 16 of the line\)"),
        (b'{"prompt": "x", "n": ' + b"1" * 5000 + b"}\n", r"p.jsonl:1: unreadable JSON \(Exceeds the limit"),
        (b'{"prompt": "x", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", r"p.jsonl:1: unreadable JSON"),
        (b'{"prompt": "x\\ud800"}\n', r"p.jsonl:1: a string holds a lone surrogate escape"),
        (b'{"prompt": "x", "topic": {"k\\udfff": 1}}\n', r"p.jsonl:1: a string holds a lone surrogate escape"),
        (b'{"prompt": 7}\n', r"p.jsonl:1: missing or empty 'prompt'"),
    ],
)
def test_bad_prompt_files_name_the_line(tmp_path, content, message):
    f = tmp_path / "p.jsonl"
    f.write_bytes(content)
    with pytest.raises(TaskError, match=message):
        FileSource(f)


def test_jsonl_records_end_at_newlines_only(tmp_path):
    """U+2028, U+0085 and a form feed may stand raw in a JSON string; str.splitlines() would cut the
    record there. A byte-order mark and CRLF line ends are read as well."""
    prompts = ["a\u2028b", "c\x85d", "e\x0cf"]
    f = tmp_path / "p.jsonl"
    f.write_bytes(
        b"\xef\xbb\xbf" + b"\r\n".join(json.dumps({"prompt": p}, ensure_ascii=False).encode() for p in prompts)
    )
    assert [it.prompt for it in FileSource(f)._items] == prompts


def test_parquet_metadata_is_stored_as_json(tmp_path):
    """A Parquet file's other columns ride along as metadata, which the prompts table stores as JSON."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = tmp_path / "p.parquet"
    pq.write_table(
        pa.table(
            {
                "prompt": ["a?"],
                "answer": [3],
                "when": [datetime.datetime(2020, 1, 2)],
                "blob": [b"\x00\xff"],
                "price": [decimal.Decimal("1.50")],
            }
        ),
        pf,
    )
    it = FileSource(pf)._items[0]
    assert (it.answer, it.metadata["when"], it.metadata["price"]) == ("3", "2020-01-02 00:00:00", "1.50")
    assert json.loads(json.dumps(it.metadata)) == it.metadata
