"""Each reward source on fixed toy inputs with known answers (no model where none is needed)."""

import json
import random
import sys

import pytest

from flywheel import config as C
from flywheel.models import rewards
from flywheel.models.generation import NextToken
from flywheel.models.rewards.rubric import pointwise_verdict
from flywheel.models.tasks.reasoning_gym import ReasoningGymSource
from flywheel.tasks.curate import curate

EASY = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def batch(prompts: dict[str, tuple[str | None, list[str]]], certainty=None) -> rewards.Batch:
    """prompt text → (reference answer, responses)."""
    p_rows, c_rows = {}, []
    for pi, (text, (answer, responses)) in enumerate(prompts.items()):
        pid = f"p{pi}"
        p_rows[pid] = dict(prompt_id=pid, prompt=text, answer=answer, metadata="{}")
        for k, r in enumerate(responses):
            c_rows.append(
                dict(
                    candidate_id=f"{pid}c{k}",
                    prompt_id=pid,
                    sample_index=k,
                    response=r,
                    n_tokens=len(r.split()),
                    self_certainty=None if certainty is None else certainty[k],
                )
            )
    return rewards.Batch(p_rows, c_rows)


def scores(source, b, models=None):
    return [v.score for v in source.judge(b, models or rewards.Models("unused"))]


def verifier(**spec):
    return rewards.Verifier(C.VerifierSource(**spec), ReasoningGymSource("chain_sum", EASY))


def test_verifier_task_uses_reasoning_gym_score_answer():
    src = ReasoningGymSource("chain_sum", EASY)
    item = src.items(3, 1)[0]
    right, wrong = item.answer, str(int(item.answer) + 1)
    b = rewards.Batch(
        {"p": dict(prompt_id="p", prompt=item.prompt, answer=item.answer, metadata=json.dumps(item.metadata))},
        [
            dict(candidate_id=f"c{k}", prompt_id="p", sample_index=k, response=r, n_tokens=1)
            for k, r in enumerate([f"The answer is {right}.", wrong, "no idea"])
        ],
    )
    assert scores(verifier(), b) == [1.0, 0.0, 0.0]


def test_verifier_exact_numeric_regex():
    b = batch({"q": ("12", ["It is 12.", "12.0000001", "13", "twelve"]), "open": (None, ["12"])})
    assert scores(verifier(match="exact"), b) == [1.0, 0.0, 0.0, 0.0, None]
    assert scores(verifier(match="numeric", tolerance=1e-3), b) == [1.0, 1.0, 0.0, 0.0, None]
    assert scores(verifier(match="regex", pattern=r"\b{answer}\b"), b) == [1.0, 1.0, 0.0, 0.0, None]
    assert scores(verifier(match="regex", pattern=r"^\d+$"), batch({"q": ("1", ["42", "4 2"])})) == [1.0, 0.0]


def test_verifier_callable(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        "def length_ok(prompt, response, answer, metadata):\n    return float(len(response) <= 3)\n"
        "def broken(prompt, response, answer, metadata):\n    raise RuntimeError('boom')\n"
        "not_callable = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    b = batch({"q": ("1", ["abc", "abcd"])})
    assert scores(verifier(match="callable", callable="my_checks:length_ok"), b) == [1.0, 0.0]
    broken = verifier(match="callable", callable="my_checks:broken")
    verdicts = broken.judge(b, rewards.Models("unused"))
    assert [v.score for v in verdicts] == [None, None] and verdicts[0].raw == "RuntimeError: boom"
    with pytest.raises(rewards.SourceError, match="failed on a probe item: RuntimeError: boom"):
        rewards.probe([broken], "q", "1", {})
    with pytest.raises(rewards.SourceError, match="cannot be imported"):
        verifier(match="callable", callable="no_such_module_xyz:f")
    with pytest.raises(rewards.SourceError, match="is not callable"):
        verifier(match="callable", callable="my_checks:not_callable")
    sys.modules.pop("my_checks", None)


def test_majority_vote_pseudo_label_and_vote_share():
    b = batch({"q1": ("7", ["7", "The answer is 7", "8", "no answer", "6"]), "tie": (None, ["3", "4", "4", "3"])})
    verdicts = rewards.MajorityVote(C.MajorityVoteSource(), None).judge(b, rewards.Models("unused"))
    assert [v.score for v in verdicts] == [1.0, 1.0, 0.0, None, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert verdicts[0].details == {"label": "7", "vote_share": 0.4}
    assert verdicts[5].details["label"] == "3", "a tie goes to the answer sampled first"
    assert not verdicts[3].parse_ok


def test_majority_vote_min_vote_share_leaves_unsure_prompts_unscored():
    b = batch({"sure": ("7", ["7", "7", "7", "8"]), "unsure": ("3", ["3", "4", "5", "6"])})
    src = C.MajorityVoteSource(min_vote_share=0.5)
    verdicts = rewards.MajorityVote(src, None).judge(b, rewards.Models("unused"))
    assert [v.score for v in verdicts] == [1.0, 1.0, 1.0, 0.0, None, None, None, None]
    assert verdicts[4].details == {"label": "3", "vote_share": 0.25} and verdicts[4].parse_ok
    # the default (0) keeps the source's hash and the config's hash as before the setting existed
    plain = rewards.MajorityVote(C.MajorityVoteSource(), None)
    assert plain.spec_hash != rewards.MajorityVote(src, None).spec_hash

    def cfg(source):
        return C.FlywheelConfig(judge={"sources": [source]}, curation={"reward": "majority_vote"})

    assert cfg("majority_vote").hash() != cfg({"type": "majority_vote", "min_vote_share": 0.5}).hash()
    assert cfg("majority_vote").hash() == cfg({"type": "majority_vote", "min_vote_share": 0.0}).hash()


def test_self_certainty_is_the_generation_statistic():
    b = batch({"q": (None, ["a", "b", "c"])}, certainty=[2.5, None, 0.1])
    assert scores(rewards.SelfCertainty(C.SelfCertaintySource(), None), b) == [2.5, None, 0.1]


def test_pointwise_verdict_expected_and_sampled():
    nt = NextToken({"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.5, "4": 0.0, "5": 0.3}, "3")
    r = pointwise_verdict(nt)
    assert r.parse_ok and r.score == pytest.approx((3 * 0.5 + 5 * 0.3) / 0.8)
    assert r.variance == pytest.approx(((3 - r.score) ** 2 * 0.5 + (5 - r.score) ** 2 * 0.3) / 0.8)
    k = pointwise_verdict(nt, samples=200, rng=random.Random(0))
    draws = json.loads(k.details)["draws"]
    assert len(draws) == 200 and set(draws) <= {3, 5, -1}
    parsed = [d for d in draws if d >= 0]
    assert k.score == pytest.approx(sum(parsed) / len(parsed)) and 0.15 < draws.count(-1) / 200 < 0.25
    assert k.variance > 0
    assert (
        pointwise_verdict(nt, samples=5, rng=random.Random(1)).score
        == pointwise_verdict(nt, samples=5, rng=random.Random(1)).score
    ), "seeded"
    unparsed = pointwise_verdict(NextToken({str(s): 0.0 for s in range(6)}, "I"))
    assert unparsed.score is None and not unparsed.parse_ok and unparsed.raw == "I"


def test_pairwise_outcomes_and_scores():
    a_better, b_better = {"A": 0.9, "B": 0.1}, {"A": 0.2, "B": 0.8}
    assert rewards.pairwise_outcome(a_better, b_better) == "x"  # x first: A; y first: B → x both times
    assert rewards.pairwise_outcome(b_better, a_better) == "y"
    assert rewards.pairwise_outcome(a_better, a_better) == "inconsistent"  # always "A": position, not content
    assert rewards.pairwise_outcome({"A": 0.0, "B": 0.0}, a_better) is None
    s = rewards.pairwise_scores(3, [(0, 1, "x"), (1, 2, "inconsistent"), (0, 2, "x")])
    assert [v.score for v in s] == [1.0, 0.0, 0.0]
    assert s[1].details == {"comparisons": 2, "wins": 0, "inconsistent": 1, "unparsed": 0}


def test_ring_pairs_cover_every_pair_at_half_n():
    rng = random.Random(0)
    assert len(rewards.ring_pairs(8, 1, rng)) == 8
    assert len(rewards.ring_pairs(8, 4, random.Random(0))) == 28  # every pair once
    assert rewards.ring_pairs(2, 1, rng) == [(0, 1)] and rewards.ring_pairs(1, 3, rng) == []


class ScriptedJudge:
    """An engine whose next-token verdicts come from a function of the rendered inputs."""

    verdict_method = "scripted"

    def __init__(self, fn):
        self.fn = fn

    def describe(self):
        return "scripted"

    def next_token(self, rubric, renders, labels, **kw):
        return self.fn(None, None, rubric, renders, labels, **kw)


def test_pairwise_scores_follow_the_judges_verdicts(monkeypatch):
    """A judge that reads the content (it prefers the answer closer to 7, in either position):
    each candidate's score is its share of wins, so the ranking is the judge's own. A pairwise
    source that ignored the verdicts (constant, positional or random scores) fails here."""

    def closer_to_seven(model, tok, rubric, renders, labels, **kw):
        out = []
        for r in renders:
            a, b = abs(int(r["response_a"]) - 7), abs(int(r["response_b"]) - 7)
            out.append(NextToken({"A": 0.9, "B": 0.1} if a < b else {"A": 0.1, "B": 0.9}, "A" if a < b else "B"))
        return out

    monkeypatch.setattr(rewards.Models, "judge_engine", lambda self, spec: ScriptedJudge(closer_to_seven))
    src = rewards.PairwiseJudge(C.PairwiseJudgeSource(opponents=3), None)
    b = batch({"q1": ("7", ["13", "8", "7", "10"])})
    verdicts = src.judge(b, rewards.Models("policy"))
    assert [v.score for v in verdicts] == [0.0, pytest.approx(2 / 3), 1.0, pytest.approx(1 / 3)]
    assert all(v.details["inconsistent"] == 0 and v.details["comparisons"] == 3 for v in verdicts)


def test_always_A_pairwise_judge_is_fully_position_biased_and_yields_no_pairs(monkeypatch):
    """A judge forced to answer "A" whatever it is shown: every comparison flips with the order."""
    from flywheel.tasks.common import StageContext
    from flywheel.tasks.judge import health, judgment_rows

    def always_a(model, tok, rubric, renders, labels, **kw):
        return [NextToken({"A": 0.99, "B": 0.01}, "A") for _ in renders]

    monkeypatch.setattr(rewards.Models, "judge_engine", lambda self, spec: ScriptedJudge(always_a))
    src = rewards.PairwiseJudge(C.PairwiseJudgeSource(opponents=3), None)
    b = batch({"q1": ("7", ["7", "8", "9", "6"]), "q2": ("1", ["1", "2"])})
    verdicts = src.judge(b, rewards.Models("policy"))
    assert all(v.score == 0.0 for v in verdicts)
    ctx = StageContext(C.FlywheelConfig(), "r", 1)
    rows = judgment_rows(ctx, src, b.candidates, verdicts)
    h = {x["metric"]: x["value"] for x in health(rows, b.candidates, b.prompts, {"pairwise_judge": "pairwise_judge"})}
    assert h["position_bias_rate"] == 1.0
    import duckdb

    from flywheel.storage.parquet import to_table

    con = duckdb.connect()
    con.register("judgments", to_table("judgments", rows))
    con.register(
        "candidates",
        to_table(
            "candidates",
            [
                dict(c, run_id="r", round=1, policy="m", seed=0, finish_reason="stop", mean_logprob=None, sampling="{}")
                for c in b.candidates
            ],
        ),
    )
    con.register(
        "prompts",
        to_table(
            "prompts",
            [
                dict(p, run_id="r", round=1, split="train", task="t", category="t", seed=None)
                for p in b.prompts.values()
            ],
        ),
    )
    curated = curate(con, C.CurationConfig(reward="pairwise_judge", min_margin=0.1))
    assert curated.pairs.num_rows == 0 and curated.funnel["prompts_uniform"] == 2


def test_health_against_the_verifier():
    from flywheel.tasks.judge import health

    cands = [dict(candidate_id=c, prompt_id="p", n_tokens=n) for c, n in (("a", 1), ("b", 5), ("c", 9))]
    rows = [
        dict(candidate_id=c, prompt_id="p", source=s, score=v, parse_ok=v is not None, details=None)
        for s, vals in (("verifier", (1.0, 0.0, 0.0)), ("llm_judge", (4.0, 3.0, None)))
        for c, v in zip("abc", vals)
    ]
    h = {
        (x["source"], x["metric"]): x["value"]
        for x in health(rows, cands, {"p": {"answer": "1"}}, {"verifier": "verifier", "llm_judge": "llm_judge"})
    }
    assert h[("llm_judge", "parse_failure_rate")] == pytest.approx(1 / 3)
    assert h[("llm_judge", "verifier_agreement")] == 0.5  # a: 4 ≥ 2.5 & right; b: 3 ≥ 2.5 but wrong
    assert h[("llm_judge", "verifier_pairwise_accuracy")] == 1.0  # the one verifier-ordered pair (a, b): 4 > 3
    assert h[("verifier", "mean_score")] == pytest.approx(1 / 3)
    assert ("verifier", "verifier_agreement") not in h


def test_contested_subset_skips_prompts_the_cheap_sources_score_alike():
    from flywheel.tasks.judge import contested

    cands = [dict(candidate_id=f"{p}{k}", prompt_id=p) for p in "abc" for k in range(2)]
    cheap = (
        [dict(source="verifier", prompt_id="a", score=s) for s in (1.0, 0.0)]
        + [dict(source="verifier", prompt_id="b", score=s) for s in (1.0, 1.0)]
        + [dict(source="verifier", prompt_id="c", score=s) for s in (0.0, None)]
        + [dict(source="majority_vote", prompt_id="c", score=s) for s in (1.0, 0.0)]
    )
    assert [c["candidate_id"] for c in contested(cands, cheap)] == ["a0", "a1", "c0", "c1"]
    assert contested(cands, []) == cands, "with no cheap source, every candidate is judged"


def test_auto_subset_is_contested_only_when_curation_decides_on_cheap_sources_alone():
    from flywheel.config import load_config
    from flywheel.models import rewards
    from flywheel.models.tasks.splits import make_source
    from flywheel.tasks.judge import subset

    def resolved(overrides, preset=None):
        cfg = load_config(None, overrides, preset=preset)
        return subset(cfg, rewards.build(cfg.judge, make_source(cfg.task)))

    assert resolved({}) == "contested"  # the default: pairs come from the verifier
    assert resolved({"curation": {"reward": "llm_judge"}}) == "all"  # Self-Rewarding: the judge is the reward
    assert resolved({"curation": {"reward": {"verifier": 1.0, "llm_judge": 0.5}}}) == "all"
    assert resolved({"curation": {"reward": {"verifier": 1.0, "llm_judge": 0.0}}}) == "contested"
    assert resolved({"curation": {"consistency": ["llm_judge"]}}) == "all"  # SCIR's filter reads the judge
    assert (
        resolved(
            {"judge": {"sources": ["verifier", {"type": "llm_judge", "previous": True}]}, "curation": {"cream": "skip"}}
        )
        == "all"
    )  # CREAM's τ too
    assert resolved({"judge": {"subset": "all"}}) == "all"
    assert resolved({"curation": {"reward": "llm_judge"}, "judge": {"subset": "contested"}}) == "contested"
    assert resolved({}, preset="label_free") == "all"  # its self-certainty is recorded on every candidate
