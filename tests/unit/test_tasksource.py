import json

import pytest

from flywheel.config import TaskConfig
from flywheel.models.decontam import Decontaminator
from flywheel.models.tasksource import (FileSource, ReasoningGymSource, TaskError, benchmark_items, make_source,
                                        train_items)

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


def test_training_prompts_never_include_benchmark_items():
    src = ReasoningGymSource("chain_sum", EASY)
    bench = benchmark_items(src, 200, seed=0)
    ids = {it.id for it in bench}
    decontam = Decontaminator([it.prompt for it in bench])
    train, removed = train_items(src, 1, 64, 0, decontam)
    assert len(train) == 64 and removed  # the space is small: overlaps exist and are removed
    assert {it.id for it, _ in removed} <= ids and all(o.share == 1.0 for _, o in removed)
    assert not ids & {it.id for it in train}
    assert len({it.id for it in train}) == 64, "prompts in a round are distinct (candidate ids depend on it)"
    assert train != train_items(src, 2, 64, 0, decontam)[0], "each round draws fresh prompts"
    assert {it.category for it in train} == {"chain_sum"}  # no category fields asked for


def test_decontamination_catches_a_planted_overlap_and_spares_neighbours():
    bench = ["State the final answer to the following arithmetic problem: 3 + 5 =",
             "Explain in detail why the sky appears blue during the day but red at sunset."] + [
        f"State the final answer to the following arithmetic problem: {a} + {b} =" for a in range(5) for b in range(4)]
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
    train, _ = train_items(src, 1, 100, 0, Decontaminator([it.prompt for it in bench]))
    assert len(train) == 10 - len(bench)
    assert src.score("2", "2", {}) == 1.0 and src.score("3", "2", {}) == 0.0 and src.score("x", None, {}) is None
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a?", "b?"]}), pf)
    assert [it.prompt for it in FileSource(pf).items(0, 2)] == ["a?", "b?"]


@pytest.mark.parametrize("content, message", [
    ("", "has no prompts"),
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', r"p.jsonl:2: malformed JSON"),
    ('{"prompt": "ok"}\n\n{"answer": "1"}\n', r"p.jsonl:3: missing or empty 'prompt'"),
    ('["a list"]\n', r"p.jsonl:1: expected a JSON object"),
])
def test_bad_prompt_files_name_the_line(tmp_path, content, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(TaskError, match=message):
        FileSource(f)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        FileSource(tmp_path / "nope.jsonl")
