"""A round with sampling.frontier on the real embedded model: the probe, the top-up, and the pass
rates recorded in the prompts table agree with the verifier's judgments."""

import json

import pytest
from run_checks import assert_every_table_matches_its_schema, small_round

from flywheel import seeds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_harness):
    from flywheel.config import load_config
    from flywheel.flows.flywheel import flywheel

    ws = tmp_path_factory.mktemp("ws")
    # a budget of 8 prompts × 4 samples: 12 prompts probed twice, 8 spare samples top up 4 of them
    frontier = {"pool": 12, "probe": 2}
    config = load_config(None, small_round("frontier", ws, 1, sampling={"frontier": frontier}))
    return ws, config, flywheel(config)


def test_the_probe_and_the_top_up_spend_the_budget_where_a_pair_can_form(run):
    from flywheel.storage import catalog

    ws, config, result = run
    assert_every_table_matches_its_schema(ws, result["run_id"])
    prompts = catalog.query(ws, "SELECT prompt_id, prompt, metadata FROM prompts WHERE split = 'train'").to_pylist()
    assert len(prompts) == 12
    cands = catalog.query(
        ws,
        """SELECT c.prompt_id, c.sample_index, c.seed, j.score FROM candidates c
           JOIN judgments j ON j.candidate_id = c.candidate_id AND j.source = 'verifier'""",
    ).to_pylist()
    by_prompt: dict = {}
    for c in cands:
        by_prompt.setdefault(c["prompt_id"], []).append(c)
    assert len(cands) <= 8 * 4 and len(cands) == 12 * 2 + 2 * result["rounds"][1]["frontier_topped_up"]
    stage_seed = seeds.stage(config.seed, 1)
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
    pairs = catalog.query(ws, "SELECT count(*) AS n FROM pairs").to_pylist()[0]["n"]
    assert pairs == result["rounds"][1]["pairs"]
    contested = sum(0 < sum(r["score"] >= 1.0 for r in rs) < len(rs) for rs in by_prompt.values())
    assert result["rounds"][1]["frontier_contested"] == contested and pairs <= contested
