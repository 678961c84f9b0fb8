"""sampling.frontier (which prompts the second pass tops up, the settings it refuses) and task.curriculum
(which level a round trains at, each level's splits)."""

import pytest

from flywheel import seeds
from flywheel.config import ConfigError, load_config
from flywheel.models import engines
from flywheel.tasks.generate import candidate_rows, top_up

R, W = True, False


def test_the_top_up_goes_to_all_right_then_all_wrong_then_contested_prompts_in_draw_order():
    right = [[W, W], [R, W], [R, R], [W, W], [R, R], [W, R]]
    # 6 more samples each: the spare budget buys 3 prompts
    assert top_up(right, spare=18, more=6) == [0, 2, 4]
    assert top_up(right, spare=17, more=6) == [2, 4]  # never a part of a prompt's top-up
    assert top_up(right, spare=30, more=6) == [0, 1, 2, 3, 4]
    assert top_up(right, spare=100, more=6) == [0, 1, 2, 3, 4, 5]
    assert top_up(right, spare=0, more=6) == []


def test_a_top_up_pass_continues_the_sample_indices_with_a_seed_of_its_own():
    prompts = [{"prompt_id": "a", "prompt": "1 + 1 ="}, {"prompt_id": "b", "prompt": "2 + 2 ="}]
    gens = [engines.Generation(str(i), 1, "stop", None, None) for i in range(6)]
    common = dict(run_id="r", round_=1, policy="p", sampling_json="{}")
    probe = candidate_rows(prompts, gens[:4], n=2, seed=7, **common)
    more = candidate_rows(prompts[:1], gens[4:], n=2, seed=seeds.top_up(7), first=2, **common)
    assert [r["sample_index"] for r in probe + more] == [0, 1, 0, 1, 2, 3]
    # the probe draws exactly what a one-pass round draws for samples 0 and 1 ...
    assert [r["seed"] for r in probe] == [seeds.row(7, p["prompt"], k) for p in prompts for k in (0, 1)]
    # ... and the top-up's seeds are new ones, its ids distinct
    assert not {r["seed"] for r in more} & {seeds.row(7, "1 + 1 =", k) for k in range(4)}
    assert len({r["candidate_id"] for r in probe + more}) == 6


@pytest.mark.parametrize(
    "frontier, more, message",
    [
        ({"pool": 64, "probe": 8}, {}, r"sampling\.frontier\.probe \(8\) must be below sampling\.n \(8\)"),
        ({"pool": 300, "probe": 2}, {}, r"pool × probe \(300 × 2\) exceeds the round's budget .* \(512 samples\)"),
        ({"pool": 64, "probe": 2}, {"preset": "label_free"}, "it needs a verifier among judge.sources"),
        ({"pool": 0, "probe": 2}, {}, r"^sampling\.frontier\.pool"),
    ],
)
def test_impossible_frontiers_are_one_line_errors(frontier, more, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, {"sampling": {"frontier": frontier}}, **more)
    assert "\n" not in str(e.value)


def test_the_frontier_enters_the_hash_only_when_set():
    plain = load_config(None, {}).hash()
    assert load_config(None, {"sampling": {"frontier": None}}).hash() == plain
    assert load_config(None, {"sampling": {"frontier": {"pool": 128}}}).hash() != plain


def test_a_round_trains_at_the_first_level_its_champion_has_not_passed():
    from flywheel.config import CurriculumConfig

    cur = CurriculumConfig(levels=[{"max_terms": 3}, {"max_terms": 3, "max_digits": 3}], threshold=0.6)
    assert cur.level({}) == 0
    assert cur.level({0: 0.59, 1: 0.9}) == 0
    assert cur.level({0: 0.6, 1: 0.1, 2: 0.9}) == 1
    assert cur.level({0: 0.7, 1: 0.61, 2: 0.2}) == 2
    assert cur.level({0: 0.7, 1: 0.61, 2: 0.95}) == 2  # the last level, once all are passed
    assert cur.level({0: 0.9, 1: None}) == 1  # unmeasured: not passed
    # and back down, should a champion lose a level
    assert cur.level({0: 0.5, 1: 0.9}) == 0


def test_each_level_has_its_own_held_out_splits_that_training_never_draws():
    from flywheel.flows.flywheel import prepare
    from flywheel.models.tasks.splits import train_items

    levels = [{"min_terms": 3, "max_terms": 3}]
    config = load_config(
        None,
        {
            "task": {"curriculum": {"levels": levels, "validation_size": 5, "size": 7}},
            "benchmark": {"size": 4, "validation_size": 3},
        },
    )
    prepared = prepare(config)
    (level,) = prepared.levels
    assert (len(level.validation), len(level.test)) == (5, 7)
    assert all(it.metadata["entry"]["metadata"]["num_terms"] == 3 for it in level.validation + level.test)
    assert {it.id for it in level.validation + level.test} <= {it.id for it in prepared.held()}
    draw = train_items(prepared.source_at(1), 2, 16, config.seed, prepared.decontaminator(), earlier=prepared.source_at)
    assert all(it.metadata["entry"]["metadata"]["num_terms"] == 3 for it in draw.items)
    assert not {it.id for it in draw.items} & {it.id for it in prepared.held()}
    # the earlier round's draw (at level 0 here) is what the fresh-prompt check recomputes
    first = train_items(prepared.source_at(0), 1, 16, config.seed, prepared.decontaminator())
    assert all(it.metadata["entry"]["metadata"]["num_terms"] == 2 for it in first.items)


def test_a_curriculum_needs_a_task_with_options_and_enters_the_hash_only_when_set(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    with pytest.raises(ConfigError, match=r"task\.curriculum varies a reasoning-gym task's options"):
        load_config(None, {"task": {"prompts_file": str(prompts), "curriculum": {"levels": [{"max_terms": 3}]}}})
    with pytest.raises(ConfigError, match=r"^task\.curriculum\.levels"):
        load_config(None, {"task": {"curriculum": {"levels": []}}})
    plain = load_config(None, {}).hash()
    assert load_config(None, {"task": {"curriculum": None}}).hash() == plain
    assert load_config(None, {"task": {"curriculum": {"levels": [{"max_terms": 3}]}}}).hash() != plain
