"""Curation rules on hand-made tables with known answers."""

import duckdb
import pyarrow as pa
import pytest

from flywheel.config import CurationConfig
from flywheel.storage.parquet import to_table
from flywheel.tasks.curate import curate


def make_con(prompts: dict[str, list[tuple]]) -> duckdb.DuckDBPyConnection:
    """prompt text → [(response, verifier score, judge score)] or [(response, {source: score})]."""
    p_rows, c_rows, j_rows = [], [], []
    for pi, (prompt, cands) in enumerate(prompts.items()):
        pid = f"p{pi}"
        p_rows.append(
            dict(
                run_id="r",
                round=1,
                prompt_id=pid,
                split="train",
                task="t",
                category=category(prompt),
                seed=None,
                prompt=prompt,
                answer=None,
                metadata=None,
            )
        )
        for ci, (resp, *scores) in enumerate(cands):
            cid = f"{pid}c{ci}"
            by_source = scores[0] if isinstance(scores[0], dict) else {"verifier": scores[0], "llm_judge": scores[1]}
            c_rows.append(
                dict(
                    run_id="r",
                    round=1,
                    candidate_id=cid,
                    prompt_id=pid,
                    policy="m",
                    sample_index=ci,
                    seed=0,
                    response=resp,
                    n_tokens=1,
                    finish_reason="stop",
                    mean_logprob=None,
                    self_certainty=None,
                    sampling="{}",
                )
            )
            for source, score in by_source.items():
                j_rows.append(
                    dict(
                        run_id="r",
                        round=1,
                        candidate_id=cid,
                        prompt_id=pid,
                        source=source,
                        spec_hash="h",
                        score=score,
                        parse_ok=score is not None,
                        raw=None,
                        details=None,
                    )
                )
    con = duckdb.connect()
    for name, rows in (("prompts", p_rows), ("candidates", c_rows), ("judgments", j_rows)):
        tbl = to_table(name, rows) if rows else pa.Table.from_pylist([], schema=to_table(name, []).schema)
        con.register(name, tbl)
    return con


def category(prompt: str) -> str:
    """Test prompts name their category before a colon: "easy: 2+2"."""
    return prompt.split(":")[0] if ":" in prompt else "t"


def pairs_of(prompts, **cfg):
    return curate(make_con(prompts), CurationConfig(**cfg)).pairs.to_pylist()


def test_best_vs_worst():
    pairs = pairs_of({"q": [("a", 1.0, 1.0), ("b", 0.0, 4.0), ("c", 0.5, 2.0)]}, min_margin=0.1)
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [("a", "b", 1.0)]
    assert pairs[0]["rule"] == "max_min" and pairs[0]["reward"] == "verifier"


def test_ties_and_all_equal_give_no_pair():
    assert pairs_of({"q": [("a", 1.0, 1.0), ("b", 1.0, 2.0)]}) == []
    assert pairs_of({"q": [("a", 0.0, 1.0), ("b", 0.0, 1.0), ("c", 0.0, 1.0)]}) == []


def test_null_scores_never_paired():
    pairs = pairs_of({"q": [("a", None, 5.0), ("b", 1.0, 1.0), ("c", 0.0, 1.0), ("d", None, 0.0)]})
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "c")]


def test_single_candidate_and_no_candidates():
    assert pairs_of({"q": [("a", 1.0, 1.0)]}) == []
    assert pairs_of({}) == []


def test_min_margin_excludes_small_gaps():
    assert pairs_of({"q": [("a", 1.0, 1.0), ("b", 0.6, 1.0)]}, min_margin=0.5) == []
    assert len(pairs_of({"q": [("a", 1.0, 1.0), ("b", 0.4, 1.0)]}, min_margin=0.5)) == 1


def test_identical_texts_are_never_a_pair():
    assert pairs_of({"q": [("same", 1.0, 1.0), ("same", 0.0, 1.0)]}) == []


def test_judge_reward_and_combined_reward():
    cands = {"q": [("a", 1.0, 1.0), ("b", 1.0, 4.0), ("c", 0.0, 5.0)]}
    judge = pairs_of(cands, reward="llm_judge", min_margin=1.0)
    assert [(p["chosen"], p["rejected"]) for p in judge] == [("c", "a")]
    combined = pairs_of(cands, reward={"verifier": 1.0, "llm_judge": 0.099}, min_margin=0.5)
    # the verifier decides (a or b over c); the judge orders a and b: b is chosen
    assert [(p["chosen"], p["rejected"]) for p in combined] == [("b", "c")]
    assert combined[0]["reward"] == "1*verifier+0.099*llm_judge"


def test_every_pair_is_strictly_ordered_and_one_per_prompt():
    prompts = {f"q{i}": [(f"r{i}{k}", float(k % 2), float(k)) for k in range(5)] for i in range(20)}
    pairs = pairs_of(prompts)
    assert len(pairs) == 20 and len({p["prompt_id"] for p in pairs}) == 20
    assert all(p["chosen"] != p["rejected"] and p["chosen_score"] > p["rejected_score"] for p in pairs)


def test_deterministic():
    prompts = {"q": [(f"r{k}", float(k % 2), 0.0) for k in range(8)]}
    assert pairs_of(prompts) == pairs_of(prompts)


@pytest.mark.parametrize("reward", ["verifier", "llm_judge", {"verifier": 1.0, "llm_judge": 0.1}])
def test_output_matches_pairs_schema(reward):
    from flywheel.storage.schemas import PAIRS

    tbl = curate(make_con({"q": [("a", 1.0, 5.0), ("b", 0.0, 0.0)]}), CurationConfig(reward=reward)).pairs
    assert tbl.schema.equals(PAIRS)


def curated(prompts, **cfg):
    return curate(make_con(prompts), CurationConfig(**cfg))


def chosen_rejected(pairs):
    return sorted((p["chosen"], p["rejected"]) for p in pairs)


# verifier scores 1.0 > 0.8 > 0.5 > 0.2 > 0.0; the judge column is unused here
LADDER = {"q": [("a", 1.0, 0.0), ("b", 0.8, 0.0), ("c", 0.5, 0.0), ("d", 0.2, 0.0), ("e", 0.0, 0.0)]}


def test_max_second_picks_the_strongest_candidate_below_the_margin():
    pairs = pairs_of(LADDER, rule="max_second", min_margin=0.3)
    assert chosen_rejected(pairs) == [("a", "c")]  # b is within the margin of a
    assert pairs[0]["rule"] == "max_second"
    two = pairs_of(LADDER, rule="max_second", min_margin=0.3, pairs_per_prompt=2)
    assert chosen_rejected(two) == [("a", "c"), ("a", "d")]


def test_max_random_pairs_the_best_with_eligible_candidates_only():
    seen = set()
    for seed in range(12):
        pairs = curate(make_con(LADDER), CurationConfig(rule="max_random", min_margin=0.3), seed=seed).pairs.to_pylist()
        assert len(pairs) == 1 and pairs[0]["chosen"] == "a"
        seen.add(pairs[0]["rejected"])
    assert seen == {"c", "d", "e"}, "every eligible candidate is drawn for some seed, and only those"
    a = curate(make_con(LADDER), CurationConfig(rule="max_random", min_margin=0.3), seed=3).pairs
    assert a.equals(curate(make_con(LADDER), CurationConfig(rule="max_random", min_margin=0.3), seed=3).pairs)


def test_max_min_with_a_cap_pairs_kth_best_with_kth_worst():
    pairs = pairs_of(LADDER, min_margin=0.3, pairs_per_prompt=3)
    # (a,e) margin 1.0, (b,d) margin 0.6, (c,c) is no pair
    assert chosen_rejected(pairs) == [("a", "e"), ("b", "d")]
    assert chosen_rejected(pairs_of(LADDER, min_margin=0.3)) == [("a", "e")]


def test_length_penalty_prefers_the_shorter_correct_answer():
    prompts = {"q": [("the answer is 7", 1.0, 0.0), ("7", 1.0, 0.0), ("8", 0.0, 0.0)]}
    con = make_con(prompts)
    con.execute(
        "CREATE OR REPLACE TABLE cands AS SELECT * REPLACE (length(response)::INTEGER AS n_tokens) FROM candidates"
    )
    con.unregister("candidates")
    con.execute("CREATE VIEW candidates AS SELECT * FROM cands")
    plain = curate(con, CurationConfig(min_margin=0.5)).pairs.to_pylist()
    assert chosen_rejected(plain) == [("the answer is 7", "8")]  # tie broken by candidate_id only
    penalised = curate(con, CurationConfig(min_margin=0.5, length_penalty=0.01)).pairs.to_pylist()
    assert chosen_rejected(penalised) == [("7", "8")]
    assert penalised[0]["margin"] == pytest.approx(1.0)  # (1 − 0.01·1) − (0 − 0.01·1)
    assert penalised[0]["chosen_tokens"] == 1 and penalised[0]["rejected_tokens"] == 1


def test_duplicates_count_once_and_are_never_paired():
    prompts = {"q": [("x  = 1", 1.0, 0.0), ("x = 1", 0.0, 0.0), ("y", 0.0, 0.0), ("x =\n1", 1.0, 0.0)]}
    c = curated(prompts, pairs_per_prompt=4)
    assert c.funnel["candidates_scored"] == 4 and c.funnel["candidates_unique"] == 2
    # "x = 1" (three spellings, best score 1.0) vs "y"
    assert [(p["chosen"], p["rejected"]) for p in c.pairs.to_pylist()] == [("x  = 1", "y")]
    # without dedup the spellings stay apart, but two spellings of one text are still never a pair
    raw = curated(prompts, dedup=False, pairs_per_prompt=4)
    assert raw.funnel["candidates_unique"] == 4
    assert all(" ".join(p["chosen"].split()) != " ".join(p["rejected"].split()) for p in raw.pairs.to_pylist())


def test_prompts_without_signal_are_dropped_and_counted():
    prompts = {
        "all right": [("a", 1.0, 0.0), ("b", 1.0, 0.0)],
        "all wrong": [("c", 0.0, 0.0), ("d", 0.0, 0.0)],
        "single": [("e", 1.0, 0.0)],
        "unscored": [("f", None, 0.0)],
        "mixed": [("g", 1.0, 0.0), ("h", 0.0, 0.0)],
        "close": [("i", 1.0, 0.0), ("j", 0.9, 0.0)],
    }
    c = curated(prompts, min_margin=0.5)
    f = c.funnel
    assert (
        f["prompts"],
        f["prompts_scored"],
        f["prompts_uniform"],
        f["prompts_below_margin"],
        f["prompts_with_signal"],
        f["pairs"],
    ) == (6, 5, 3, 1, 1, 1)
    assert chosen_rejected(c.pairs.to_pylist()) == [("g", "h")]


def test_category_balance_and_cap():
    prompts = {f"easy: {i}": [(f"r{i}", 1.0, 0.0), (f"w{i}", 0.0, 0.0)] for i in range(5)}
    prompts |= {f"hard: {i}": [(f"R{i}", 1.0, 0.0), (f"W{i}", 0.0, 0.0)] for i in range(2)}

    def per_category(**cfg):
        from collections import Counter

        return dict(Counter(p["category"] for p in pairs_of(prompts, **cfg)))

    assert per_category() == {"easy": 5, "hard": 2}
    assert per_category(balance_categories=True) == {"easy": 2, "hard": 2}
    assert per_category(max_pairs_per_category=3) == {"easy": 3, "hard": 2}
    assert per_category(balance_categories=True, max_pairs_per_category=1) == {"easy": 1, "hard": 1}


def test_sft_set_is_the_best_sample_above_the_threshold():
    prompts = {
        "q1": [("a", 1.0, 0.0), ("b", 0.0, 0.0)],
        "q2": [("c", 0.0, 0.0), ("d", 0.5, 0.0)],
        "q3": [("e", 1.0, 0.0), ("f", 1.0, 0.0)],
    }
    sft = curated(prompts, sft_threshold=1.0).sft.to_pylist()
    assert sorted((r["prompt"], r["completion"]) for r in sft) == [("q1", "a"), ("q3", "e")]
    assert all(r["score"] == 1.0 for r in sft)
    assert len(curated(prompts, sft_threshold=0.5).sft) == 3
    # ReST-EM: up to sft_per_prompt distinct samples per prompt, best first, none below the threshold
    from flywheel.storage import datacard

    cfg = CurationConfig(sft_threshold=0.5, sft_per_prompt=2)
    result = curate(make_con(prompts), cfg)
    two = result.sft.to_pylist()
    assert sorted((r["prompt"], r["completion"]) for r in two) == [("q1", "a"), ("q2", "d"), ("q3", "e"), ("q3", "f")]
    card = datacard.render("r", 1, cfg, result.funnel, result.pairs, result.sft, [])
    assert "| SFT examples (a prompt's best 2 distinct samples with reward ≥ 0.5) | 4 |" in card
    from flywheel.storage.schemas import SFT

    assert curated(prompts).sft.schema.equals(SFT)


def test_weighted_ensemble_and_prompt_minmax():
    # self_certainty in nats (large), majority_vote 0/1: raw weights let certainty dominate
    prompts = {
        "q": [
            ("a", {"majority_vote": 1.0, "self_certainty": 10.0}),
            ("b", {"majority_vote": 0.0, "self_certainty": 14.0}),
            ("c", {"majority_vote": 1.0, "self_certainty": 12.0}),
        ]
    }
    w = {"majority_vote": 1.0, "self_certainty": 0.5}
    raw = pairs_of(prompts, reward=w, min_margin=0.5)
    assert chosen_rejected(raw) == [("b", "a")]  # 7.0 vs 6.0: certainty decides
    scaled = pairs_of(prompts, reward=w, normalize="prompt_minmax", min_margin=0.5)
    # scaled certainty: a 0, b 1, c 0.5 → rewards a 1.0, b 0.5, c 1.25
    assert chosen_rejected(scaled) == [("c", "b")]
    assert scaled[0]["margin"] == pytest.approx(0.75)


def test_a_null_in_any_weighted_source_excludes_the_candidate():
    prompts = {
        "q": [
            ("a", {"verifier": 1.0, "llm_judge": None}),
            ("b", {"verifier": 0.0, "llm_judge": 1.0}),
            ("c", {"verifier": 1.0, "llm_judge": 2.0}),
        ]
    }
    pairs = pairs_of(prompts, reward={"verifier": 1.0, "llm_judge": 0.1})
    assert chosen_rejected(pairs) == [("c", "b")]


def test_consistency_filter_keeps_only_pairs_every_source_orders_alike():
    # q1: verifier and judge agree on a over b; q2: they disagree (judge prefers the wrong answer)
    prompts = {
        "q1": [("a", {"verifier": 1.0, "llm_judge": 4.0}), ("b", {"verifier": 0.0, "llm_judge": 1.0})],
        "q2": [("c", {"verifier": 1.0, "llm_judge": 1.0}), ("d", {"verifier": 0.0, "llm_judge": 5.0})],
        "q3": [("e", {"verifier": 1.0, "llm_judge": None}), ("f", {"verifier": 0.0, "llm_judge": 2.0})],
    }
    assert len(pairs_of(prompts)) == 3
    c = curated(prompts, consistency=["verifier", "llm_judge"])
    assert chosen_rejected(c.pairs.to_pylist()) == [("a", "b")]  # a NULL judge score is no agreement
    assert c.funnel["pairs_eligible"] == 3 and c.funnel["pairs_consistent"] == 1


def test_cream_tau_per_prompt_and_skip():
    def cand(r, v, now, before):
        return (r, {"verifier": v, "llm_judge": now, "llm_judge@previous": before})

    prompts = {
        "agree": [cand("a", 1.0, 3.0, 4.0), cand("b", 0.0, 2.0, 3.0), cand("c", 0.0, 1.0, 2.0)],
        "reverse": [cand("d", 1.0, 1.0, 3.0), cand("e", 0.0, 2.0, 2.0), cand("f", 0.0, 3.0, 1.0)],
    }
    off = curated(prompts)
    taus = {p["chosen"]: p["cream_tau"] for p in off.pairs.to_pylist()}
    assert taus == {"a": pytest.approx(1.0), "d": pytest.approx(-1.0)}
    assert off.funnel["cream_tau"] == pytest.approx(0.0)
    skip = curated(prompts, cream="skip", cream_min_tau=0.0)
    assert [p["chosen"] for p in skip.pairs.to_pylist()] == ["a"]
    assert skip.funnel["pairs_cream_kept"] == 1
    # no previous-round scores (round 1): τ is NULL and nothing is skipped
    first = {k: [(r, {"verifier": s["verifier"], "llm_judge": 1.0}) for r, s in v] for k, v in prompts.items()}
    c = curated(first, cream="skip")
    assert len(c.pairs) == 2 and all(p["cream_tau"] is None for p in c.pairs.to_pylist())


def test_partial_credit_never_makes_a_wrong_answer_chosen():
    """'It would take 3 or 30' (partial credit 0.5) beat a wrong answer (0) by the default margin:
    with a verifier in the loop the chosen side must be exactly correct, unless chosen: any."""
    from flywheel.tasks.curate import pair_labels

    prompts = {
        "3 - 3 =": [("It would take 3 or 30", 0.5, 3.0), ("7", 0.0, 1.0)],
        "2 + 2 =": [("4", 1.0, 4.0), ("It is 4 or 40", 0.5, 2.0), ("5", 0.0, 1.0)],
    }
    con = make_con(prompts)
    strict = curate(con, CurationConfig(min_margin=0.5), verifier="verifier")
    assert [(p["chosen"], p["rejected"]) for p in strict.pairs.to_pylist()] == [("4", "5")]
    assert (strict.funnel["pairs_eligible"], strict.funnel["pairs_chosen_correct"]) == (2, 1)
    assert pair_labels(con, strict.pairs, "verifier") == {"chosen_exact": 1.0, "rejected_wrong": 1.0}
    loose = curate(make_con(prompts), CurationConfig(min_margin=0.5, chosen="any"), verifier="verifier")
    assert sorted(p["chosen"] for p in loose.pairs.to_pylist()) == ["4", "It would take 3 or 30"]
    assert pair_labels(make_con(prompts), loose.pairs, "verifier") == {"chosen_exact": 0.5, "rejected_wrong": 1.0}
    # no verifier in the loop (label-free): nothing to check against, nothing filtered
    assert curate(make_con(prompts), CurationConfig(min_margin=0.5)).funnel["pairs_chosen_correct"] == 2
