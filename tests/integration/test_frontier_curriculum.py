"""Two rounds with sampling.frontier and task.curriculum on the real embedded model: the probe, the
top-up, and the pass rates recorded in the prompts table agree with the verifier's judgments; each
round trains at the level its champion's scores call for, and every level is scored every round."""

import json

import pytest
from run_checks import assert_every_table_matches_its_schema, small_round

from flywheel import seeds

pytestmark = pytest.mark.slow

# level 0: one-digit sums, which the embedded model often gets right; level 1: three terms
LEVELS = [{"min_terms": 3, "max_terms": 3}]


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_harness):
    from flywheel.config import load_config
    from flywheel.flows.flywheel import flywheel

    ws = tmp_path_factory.mktemp("ws")
    # a budget of 8 prompts × 4 samples: 12 prompts probed twice, 8 spare samples top up 4 of them
    frontier = {"pool": 12, "probe": 2}
    curriculum = {"levels": LEVELS, "threshold": 0.1, "validation_size": 8, "size": 8}
    options = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    config = load_config(
        None,
        small_round(
            "frontier", ws, 2, sampling={"frontier": frontier}, task={"options": options, "curriculum": curriculum}
        ),
    )
    return ws, config, flywheel(config)


def test_the_probe_and_the_top_up_spend_the_budget_where_a_pair_can_form(run):

    ws, config, result = run
    assert_every_table_matches_its_schema(ws, result["run_id"])
    for k in (1, 2):
        check_frontier_round(ws, config, result, k)


def check_frontier_round(ws, config, result, k):
    from flywheel.storage import catalog

    prompts = catalog.query(
        ws, f"SELECT prompt_id, prompt, metadata FROM prompts WHERE split = 'train' AND round = {k}"
    ).to_pylist()
    assert len(prompts) == 12
    cands = catalog.query(
        ws,
        f"""SELECT c.prompt_id, c.sample_index, c.seed, j.score FROM candidates c
           JOIN judgments j ON j.candidate_id = c.candidate_id AND j.source = 'verifier' WHERE c.round = {k}""",
    ).to_pylist()
    by_prompt: dict = {}
    for c in cands:
        by_prompt.setdefault(c["prompt_id"], []).append(c)
    assert len(cands) <= 8 * 4 and len(cands) == 12 * 2 + 2 * result["rounds"][k]["frontier_topped_up"]
    stage_seed = seeds.stage(config.seed, k)
    order = []
    for p in prompts:
        rows = sorted(by_prompt[p["prompt_id"]], key=lambda r: r["sample_index"])
        assert [r["sample_index"] for r in rows] in ([0, 1], [0, 1, 2, 3])
        # the probe's samples are a one-pass round's samples 0 and 1; the top-up has its own seed
        assert [r["seed"] for r in rows[:2]] == [seeds.row(stage_seed, p["prompt"], k) for k in (0, 1)]
        assert [r["seed"] for r in rows[2:]] == [seeds.row(seeds.top_up(stage_seed), p["prompt"], k) for k in (0, 1)][
            : len(rows) - 2
        ]
        record = json.loads(p["metadata"])["frontier"]
        right = [r["score"] >= 1.0 for r in rows]
        assert record == {
            "probe_samples": 2,
            "probe_pass_rate": sum(right[:2]) / 2,
            "samples": len(rows),
            "pass_rate": sum(right) / len(rows),
        }
        order.append((len(rows) > 2, sum(right[:2])))
    # the top-up went first to the all-right probes, then the all-wrong, never to a contested one
    # before them
    topped = {hits for more, hits in order if more}
    passed_over = {hits for more, hits in order if not more}
    if 1 in topped:
        assert passed_over <= {1}
    if 0 in topped:
        assert 2 not in passed_over
    # pairs form from these candidates, as from a one-pass round's
    pairs = catalog.query(ws, f"SELECT count(*) AS n FROM pairs WHERE round = {k}").to_pylist()[0]["n"]
    assert pairs == result["rounds"][k]["pairs"]
    contested = sum(0 < sum(r["score"] >= 1.0 for r in rs) < len(rs) for rs in by_prompt.values())
    assert result["rounds"][k]["frontier_contested"] == contested and pairs <= contested


def test_each_round_trains_at_the_level_its_champion_calls_for_and_every_level_is_scored(run):
    import mlflow

    from flywheel.storage import catalog
    from flywheel.tasks import promote

    ws, config, result = run
    cur, history = config.task.curriculum, result["rounds"]
    levels_seen = []
    for k in (1, 2):
        champion = _champion_before(history, k)
        level = cur.level(promote.Champion.of("x", 0, champion).level_scores())
        assert history[k]["curriculum_level"] == level
        levels_seen.append(level)
        terms = {
            json.loads(r["metadata"])["entry"]["metadata"]["num_terms"]
            for r in catalog.query(
                ws, f"SELECT metadata FROM prompts WHERE split = 'train' AND round = {k}"
            ).to_pylist()
        }
        assert terms == ({3} if level == 1 else {2})
    assert 1 in levels_seen, "the run never stepped up: the test would not cover a level above 0"
    # every level's splits, every round, in the benchmarks table, the metrics and MLflow
    suites = catalog.query(ws, "SELECT round, suite, count(*) AS n FROM benchmarks GROUP BY ALL").to_pylist()
    for k in (0, 1, 2):
        mine = {r["suite"]: r["n"] for r in suites if r["round"] == k}
        assert mine["chain_sum@1-validation"] == 8 and mine["chain_sum@1-test"] == 8
        assert history[k]["level_validation_exact_match.0"] == history[k]["validation_exact_match"]
        assert {"level_validation_exact_match.1", "level_exact_match.1"} <= set(history[k])
    rounds = catalog.query(ws, "SELECT round, curriculum_level, mlflow_run_id FROM rounds ORDER BY round").to_pylist()
    assert [r["curriculum_level"] for r in rounds] == [None, *levels_seen]
    client = mlflow.MlflowClient()
    for r in rounds[1:]:
        assert client.get_run(r["mlflow_run_id"]).data.metrics["curriculum_level"] == r["curriculum_level"]


def _champion_before(history, k):
    """The metrics of the champion round k started from: the last promoted round before it."""
    promoted = [h for h in history[1:k] if h["promoted"]]
    return promoted[-1] if promoted else history[0]
