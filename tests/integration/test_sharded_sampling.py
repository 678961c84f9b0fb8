"""The generate stage sharded across worker processes (model.workers) on the real embedded model:
two workers write exactly the rows one process writes for the same shards."""

from __future__ import annotations

import pytest

from flywheel.config import load_config

pytestmark = pytest.mark.slow


def _generate(tmp_path, name: str, workers: int):
    from flywheel.models import loading
    from flywheel.models.tasks.splits import make_source, train_items
    from flywheel.storage import parquet
    from flywheel.tasks.common import StageContext
    from flywheel.tasks.generate import generate_task

    config = load_config(
        None,
        {
            "workspace": str(tmp_path / name),
            "task": {"prompts_per_round": 6},
            "sampling": {"n": 4, "max_new_tokens": 24, "batch_size": 8, "shards": 2},
            "model": {"workers": workers},
        },
    )
    items = train_items(make_source(config.task), 1, 6, config.seed, None)[0]
    policy = loading.resolve(config.model.name)
    result = generate_task.fn(StageContext(config, "run", 1), items, policy)
    return config, result, parquet.read_table(config.workspace, "candidates", "run", 1).to_pylist()


def test_two_workers_write_the_rows_one_process_writes(tmp_path):
    one_cfg, one, rows_one = _generate(tmp_path, "one", 1)
    two_cfg, two, rows_two = _generate(tmp_path, "two", 2)
    assert one["candidates"] == two["candidates"] == 6 * 4 == len(rows_two)
    assert two["generate_engine"].endswith("(2 workers)")
    assert rows_one == rows_two  # every column: ids, seeds, responses, token counts, log-prob statistics
    assert len({r["response"] for r in rows_two}) > 6, "samples differ from one another"
    # the number of workers is speed, not meaning: a run resumes with more or fewer of them
    assert one_cfg.hash() == two_cfg.hash()
    print(
        f"\n6 prompts × 4 samples in 2 shards: 1 process {one['generate_seconds']:.1f} s, "
        f"2 workers {two['generate_seconds']:.1f} s (model loads included); rows identical"
    )
