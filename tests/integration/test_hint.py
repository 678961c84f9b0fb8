"""A round with sampling.hint on the real embedded model: the prompts whose samples the verifier found
all wrong, and only those, are sampled again with their answer given; the hinted samples that show
their work (not the answer alone) are judged,
recorded and curated as the prompt's own, and a pair trains on the prompt as asked, without the hint."""

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
    # two-digit sums: the embedded model gets most of them wrong in all 4 samples
    config = load_config(None, small_round("hint", ws, 1, sampling={"hint": {"samples": 3}}))
    return ws, config, flywheel(config)


def test_all_wrong_prompts_and_only_they_are_sampled_again_with_their_answer(run):
    from flywheel.models.tasks import Item
    from flywheel.models.tasks.splits import make_source
    from flywheel.storage import catalog

    ws, config, result = run
    assert_every_table_matches_its_schema(ws, result["run_id"])
    hint, stage_seed = config.sampling.hint, seeds.stage(config.seed, 1)
    prompts = catalog.query(
        ws, "SELECT prompt_id, prompt, answer, metadata FROM prompts WHERE split = 'train' AND round = 1"
    ).to_pylist()
    cands = catalog.query(
        ws,
        """SELECT c.candidate_id, c.prompt_id, c.sample_index, c.seed, c.sampling, c.response, j.score FROM candidates c
           JOIN judgments j ON j.candidate_id = c.candidate_id AND j.source = 'verifier' WHERE c.round = 1""",
    ).to_pylist()
    source = make_source(config.task)
    hinted_prompts = right_prompts = kept = 0
    for p in prompts:
        rows = sorted((c for c in cands if c["prompt_id"] == p["prompt_id"]), key=lambda c: c["sample_index"])
        own, more = rows[:4], rows[4:]
        assert [c["sample_index"] for c in own] == [0, 1, 2, 3]
        assert not any(json.loads(c["sampling"]).get("hinted") for c in own)
        record = json.loads(p["metadata"]).get("hint")
        if any(c["score"] >= 1.0 for c in own):
            assert more == [] and record is None
            continue
        # sampled again: 3 samples of the hinted prompt, indices after n, seeds of their own; those
        # that state the answer without their work are dropped (sampling.hint.require_work)
        text = hint.template.format(prompt=p["prompt"], answer=p["answer"])
        indices = [c["sample_index"] for c in more]
        assert set(indices) <= {4, 5, 6} and indices == sorted(set(indices))
        assert [c["seed"] for c in more] == [seeds.row(seeds.hint(stage_seed), text, i - 4) for i in indices]
        assert all(json.loads(c["sampling"])["hinted"] is True for c in more)
        item = Item(p["prompt"], p["answer"], "chain_sum")
        assert all(source.shows_work(c["response"], item) for c in more)
        hits = sum(c["score"] >= 1.0 for c in more)
        assert record == {"samples": 3, "kept": len(more), "right": hits}
        hinted_prompts += 1
        right_prompts += hits > 0
        kept += len(more)
    metrics = result["rounds"][1]
    assert metrics["hint_prompts"] == hinted_prompts > 0
    assert metrics["hint_prompts_right"] == right_prompts
    assert metrics["hint_samples"] == kept
    assert metrics["hint_samples_answer_only"] == 3 * hinted_prompts - kept
    assert metrics["candidates"] == 8 * 4 + kept
    assert right_prompts > 0, "no hinted sample was right: the test would not cover a hinted pair"
    assert metrics["hint_samples_answer_only"] > 0, "no hinted sample was dropped: the test would not cover it"


def test_a_right_hinted_sample_is_a_pairs_chosen_response_and_is_trained_on(run):
    from flywheel.storage import catalog

    ws, _, result = run
    pairs = catalog.query(
        ws,
        """SELECT p.chosen, p.chosen_score, c.sampling, c.response, c.sample_index FROM pairs p
           JOIN candidates c ON c.candidate_id = p.chosen_id WHERE p.round = 1""",
    ).to_pylist()
    hinted = [p for p in pairs if json.loads(p["sampling"]).get("hinted")]
    assert hinted, "no pair chose a hinted sample"
    assert all(p["chosen"] == p["response"] and p["chosen_score"] >= 1.0 and p["sample_index"] >= 4 for p in hinted)
    # the train stage trained on every pair, the hinted ones among them
    assert result["rounds"][1]["train_rows"] == len(pairs) == result["rounds"][1]["pairs"]


def test_judge_health_describes_the_policys_own_samples_without_the_hinted_ones(run):
    from flywheel.storage import catalog

    ws, _, result = run
    own = catalog.query(
        ws,
        """SELECT avg(j.score) AS mean, count(*) AS n FROM judgments j JOIN candidates c USING (candidate_id)
           WHERE j.round = 1 AND j.source = 'verifier' AND coalesce(c.sampling->>'hinted', 'false') <> 'true'""",
    ).to_pylist()[0]
    assert own["n"] == 8 * 4
    assert result["rounds"][1]["verifier_mean_score"] == pytest.approx(own["mean"])
    judged = catalog.query(
        ws, "SELECT value FROM judge_health WHERE round = 1 AND source = 'verifier' AND metric = 'judged'"
    ).to_pylist()
    assert [r["value"] for r in judged] == [8 * 4]
