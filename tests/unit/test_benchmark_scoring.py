"""A benchmark item without a reference answer is unscored (NULL), never a 0; a suite with none
scored reports no accuracy; the promotion gate says it could not compare accuracy."""

import json

from flywheel.config import PromotionConfig
from flywheel.models.hf.sampling import Generation
from flywheel.models.tasks.prompts_file import FileSource
from flywheel.models.tasks.splits import benchmark_items
from flywheel.tasks.benchmark import score_rows, summarize
from flywheel.tasks.promote import Champion, decide


def _file(tmp_path, rows):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return FileSource(f)


def _gen(text):
    return Generation(text, 2, "stop", -0.1, 1.0)


def test_items_without_answers_are_unscored_not_wrong(tmp_path):
    src = _file(tmp_path, [{"prompt": "2+2?", "answer": "4"}, {"prompt": "Write a haiku."}])
    items = src.items(0, 2)
    rows = score_rows(items, [_gen("4"), _gen("leaves fall")], src, run_id="r", round_=0, model="m", suite="s")
    assert [r["score"] for r in rows] == [1.0, None]
    s = summarize(rows)
    assert s["accuracy"] == 1.0 and s["scored_items"] == 1, "the unscored item does not count as wrong"


def test_a_suite_with_no_reference_answers_reports_no_accuracy(tmp_path):
    src = _file(tmp_path, [{"prompt": f"Write poem {i}."} for i in range(3)])
    items = src.items(0, 3)
    rows = score_rows(items, [_gen("x")] * 3, src, run_id="r", round_=0, model="m", suite="s")
    assert summarize(rows)["accuracy"] is None and summarize(rows)["scored_items"] == 0
    ok, reasons = decide(
        {"accuracy": None, "mean_response_tokens": 10.0, "validation_exact_match": None},
        Champion("m0", 0, None, 10.0),
        PromotionConfig(),
        trained=True,
    )
    assert ok and any("validation exact match not measured" in r and "unscored" in r for r in reasons), reasons


def test_the_held_out_part_of_a_file_takes_lines_with_answers_first(tmp_path):
    rows = [{"prompt": f"open question {i}"} for i in range(8)] + [
        {"prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(2)
    ]
    bench = benchmark_items(_file(tmp_path, rows), 100, 0)
    assert len(bench) == 2 and all(it.answer is not None for it in bench)


def test_a_file_splits_into_validation_and_test_without_overlap(tmp_path):
    from flywheel.models.tasks.splits import eval_items

    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(50)]
    validation, test = eval_items(_file(tmp_path, rows), 100, 200, 0)
    assert len(validation) + len(test) == 10  # a fifth of the file
    assert len(validation) == 3 and not {it.id for it in validation} & {it.id for it in test}
    tiny_v, tiny_t = eval_items(_file(tmp_path, rows[:5]), 100, 200, 0)
    assert (len(tiny_v), len(tiny_t)) == (0, 1)  # one item can only be the test split
