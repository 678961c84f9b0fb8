"""lm-evaluation-harness suites (benchmark.lm_eval) on the real embedded model, offline: a task
defined by a YAML file over a local JSONL file, run by lm-eval's own evaluator."""

import json
from pathlib import Path

import pytest

from flywheel import config as C
from flywheel.errors import ConfigError
from flywheel.models import engines, harness, loading

SUMS = [(3, 4), (9, 2), (5, 5), (1, 8), (6, 2), (7, 1)]


def local_task(folder: Path, name: str = "local_sums") -> Path:
    data = folder / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a} + {b} =", "answer": str(a + b)}) + "\n" for a, b in SUMS))
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return folder


def test_local_jsonl_task_runs_offline_on_the_embedded_model(tmp_path):
    cfg = C.LmEvalConfig(tasks=["local_sums"], include_path=local_task(tmp_path), batch_size=8)
    harness.check(cfg)
    ref = loading.resolve("embedded:smollm2-135m-instruct")
    engine = engines.open_engine(C.ModelConfig(), ref)
    metrics, rows = harness.evaluate(cfg, ref, engine, seed=0)
    got = metrics["lm_eval.local_sums.exact_match.first-number"]
    items = rows["local_sums"]
    assert len(items) == len(SUMS)
    assert len({r["item_id"] for r in items}) == len(SUMS)
    # the metric is the mean of the per-item scores, each exact (0 or 1), and the rows hold the answers given
    assert [r["score"] for r in items if r["score"] not in (0.0, 1.0)] == []
    assert got == pytest.approx(sum(r["score"] for r in items) / len(SUMS))
    assert all(r["response"] for r in items) and all(r["n_tokens"] >= 1 for r in items)
    assert {r["extracted"] for r in items} == {str(a + b) for a, b in SUMS}
    # the same model, loaded by lm-eval itself from the checkpoint path (other engines): the same answers
    metrics2, rows2 = harness.evaluate(cfg, ref, None, seed=0)
    assert [r["response"] for r in rows2["local_sums"]] == [r["response"] for r in items]
    assert metrics2 == metrics


def test_unknown_task_and_bad_folder_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown lm_eval task: no_such_task \(include_path"):
        harness.check(C.LmEvalConfig(tasks=["no_such_task"], include_path=local_task(tmp_path)))
    with pytest.raises(ValueError, match="include_path is not a folder"):
        C.LmEvalConfig(tasks=["x"], include_path=tmp_path / "missing")
    with pytest.raises(ValueError):
        C.LmEvalConfig(tasks=[])


def test_no_lm_eval_suites_keep_the_config_hash():
    base = C.FlywheelConfig()
    assert base.benchmark.lm_eval is None
    with_suite = C.FlywheelConfig(benchmark={"lm_eval": {"tasks": ["arc_easy"]}})
    assert with_suite.hash() != base.hash()
    # the suites' settings are part of what a round means (the default's hash without them: tests/unit/test_engines.py)
    assert C.FlywheelConfig(benchmark={"lm_eval": {"tasks": ["arc_easy"], "limit": 5}}).hash() != with_suite.hash()


def test_benchmark_stage_writes_lm_eval_rows_and_metrics(tmp_path):
    """The benchmark stage with benchmark.lm_eval: the suite's metrics beside the task's own, and its
    item rows in the benchmarks table (suite lm_eval:<task>), queryable with DuckDB."""
    from flywheel.models.tasks.splits import eval_items, make_source
    from flywheel.storage import catalog
    from flywheel.tasks.benchmark import benchmark_task
    from flywheel.tasks.common import StageContext

    cfg = C.load_config(
        None,
        {
            "workspace": str(tmp_path / "ws"),
            "benchmark": {
                "size": 4,
                "validation_size": 2,
                "guards": [],
                "lm_eval": {"tasks": ["local_sums"], "include_path": str(local_task(tmp_path)), "batch_size": 8},
            },
        },
    )
    validation, test = eval_items(make_source(cfg.task), 2, 4, cfg.seed)
    out = benchmark_task.fn(StageContext(cfg, "run1", 0), validation, test, loading.resolve(cfg.model.name))
    assert 0.0 <= out["lm_eval.local_sums.exact_match.first-number"] <= 1.0 and out["lm_eval_seconds"] > 0
    assert out["exact_match"] is not None  # the task's own test split still ran
    rows = catalog.query(tmp_path / "ws", "select suite, score from benchmarks where run_id = 'run1'").to_pylist()
    lm = [r for r in rows if r["suite"] == "lm_eval:local_sums"]
    assert len(lm) == len(SUMS) and len([r for r in rows if r["suite"].endswith("-test")]) == 4
    assert sum(r["score"] for r in lm) / len(lm) == pytest.approx(out["lm_eval.local_sums.exact_match.first-number"])
