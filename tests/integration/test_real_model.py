"""Fast checks on the real embedded model (seconds each, once the checkpoint is cached)."""

import pytest

from flywheel.models import loading
from flywheel.models.hf import reference, sampling, scoring
from flywheel.models.rewards.rubric import load_rubric


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return loading.load(loading.resolve("embedded:smollm2-135m-instruct"))


QUESTIONS = [
    "State the final answer to the following arithmetic problem: 3 + 4 =",
    "State the final answer to the following arithmetic problem: 9 - 2 =",
]
RESPONSES = ["The answer is 7.", "9 - 2 equals 11, because subtraction is hard and I am a long response."]


def test_embedded_model_is_a_plain_checkpoint(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert tok.chat_template


def test_judge_prefix_reuse_matches_full_prompts(model_and_tokenizer):
    model, tok = model_and_tokenizer
    rubric = load_rubric()
    qs, rs = QUESTIONS * 3, RESPONSES * 3
    fast = reference.llm_judge(model, tok, rubric, qs, rs, batch_size=4, max_prompt_tokens=1024)
    full = reference.llm_judge(model, tok, rubric, qs, rs, batch_size=4, max_prompt_tokens=1024, reuse_prefix=False)
    assert [f.parse_ok for f in fast] == [f.parse_ok for f in full]
    for f, g in zip(fast, full):
        if f.parse_ok:
            assert f.score == pytest.approx(g.score, abs=0.02)
    # the same candidate gets the same verdict whatever its batch neighbours
    assert fast[0].score == pytest.approx(fast[2].score, abs=1e-3)


def test_generation_is_seeded_and_records_token_stats(model_and_tokenizer):
    model, tok = model_and_tokenizer
    kw = {"max_new_tokens": 16, "batch_size": 4, "do_sample": True, "temperature": 1.0, "seed": 7}
    a = sampling.generate(model, tok, QUESTIONS, n=2, **kw)
    b = sampling.generate(model, tok, QUESTIONS, n=2, **kw)
    assert [g.response for g in a] == [g.response for g in b]
    # seeds are per sample: a prompt's samples do not depend on the other prompts or their order
    alone = sampling.generate(model, tok, QUESTIONS[1:], n=2, **kw)
    assert [g.response for g in alone] == [g.response for g in a[2:]]
    assert sampling.generate(model, tok, QUESTIONS, n=2, **dict(kw, seed=8)) != a
    assert all(g.finish_reason in ("stop", "length") and 0 < g.n_tokens <= 16 for g in a)
    assert all(g.mean_logprob is not None and g.mean_logprob < 0 for g in a)
    assert all(g.self_certainty is not None and g.self_certainty > 0 for g in a)
    greedy = sampling.generate(model, tok, QUESTIONS, max_new_tokens=16, batch_size=2, do_sample=False)
    alone = sampling.generate(model, tok, QUESTIONS[1:], max_new_tokens=16, batch_size=1, do_sample=False)
    assert greedy[1].response == alone[0].response, "left padding must not change a greedy answer"


def test_sft_round_trains_a_merged_checkpoint(tmp_path):
    """train.method: sft — TRL's SFTTrainer with LoRA on prompt/completion rows, merged and saved whole."""
    import torch
    from safetensors.torch import load_file

    from flywheel.config import load_config
    from flywheel.models.training import trainer

    base = loading.resolve("embedded:smollm2-135m-instruct")
    cfg = load_config(None, {"train": {"method": "sft", "sft": {"max_steps": 2, "learning_rate": 1e-3}}}).train
    rows = [{"prompt": q, "completion": a} for q, a in zip(QUESTIONS, ["7", "7"])] * 4
    out = tmp_path / "round-model"
    metrics = trainer.train(base, rows, cfg, out, base=base, seed=0)
    assert metrics["train_steps"] == 2 and metrics["train_loss"] > 0
    assert (out / "config.json").is_file() and not (tmp_path / ".round-model.work").exists(), "work dir cleaned up"
    before, after = load_file(f"{base}/model.safetensors"), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "SFT left every weight unchanged"


def test_sequence_logprobs_batched_and_meaningful(model_and_tokenizer):
    """The implicit reward's building block: log π(response | prompt), independent of batching."""
    model, tok = model_and_tokenizer
    qs = [QUESTIONS[0]] * 3
    rs = ["7", "Seven hundred purple elephants.", "The answer is 7."]
    batched = scoring.sequence_logprobs(model, tok, qs, rs, batch_size=3)
    alone = [scoring.sequence_logprobs(model, tok, [q], [r], batch_size=1)[0] for q, r in zip(qs, rs)]
    assert batched == pytest.approx(alone, abs=1e-3), "left padding must not change a sequence's log-prob"
    assert all(lp < 0 for lp in batched)
    assert batched[0] > batched[1], "the right short answer is likelier than nonsense"


def test_pairwise_judge_on_the_real_model(model_and_tokenizer):
    """Both orders are asked; every comparison ends as a win, a loss or an inconsistency."""
    from flywheel import config as C
    from flywheel.models import rewards

    src = rewards.PairwiseJudge(C.PairwiseJudgeSource(opponents=2), None)
    batch = rewards.Batch(
        {"p": {"prompt_id": "p", "prompt": QUESTIONS[0], "answer": "7", "metadata": "{}"}},
        [
            {"candidate_id": f"c{k}", "prompt_id": "p", "sample_index": k, "response": r, "n_tokens": 3}
            for k, r in enumerate(["7", "The answer is 7.", "12", "I like turtles."])
        ],
    )
    models = rewards.Models(loading.resolve("embedded:smollm2-135m-instruct"))
    verdicts = src.judge(batch, models)
    assert len(verdicts) == 4 and all(v.parse_ok and 0.0 <= v.score <= 1.0 for v in verdicts)
    d = [v.details for v in verdicts]
    n_pairs = 6  # opponents = n // 2: every pair of the 4 responses, once
    assert sum(x["comparisons"] for x in d) == 2 * n_pairs  # each comparison counts for both responses
    # every comparison is a consistent win for one side or an inconsistency (counted on both sides)
    assert (
        sum(x["wins"] for x in d) + sum(x["inconsistent"] for x in d) // 2 + sum(x["unparsed"] for x in d) // 2
        == n_pairs
    )


def test_continuous_batching_matches_transformers_generate(model_and_tokenizer):
    """The fast decoder's greedy answers and token statistics equal transformers' own generate()
    on the same prompts, however the prompts are batched (benchmarks/round.py measures the speed)."""
    model, tok = model_and_tokenizer
    prompts = [
        f"State the final answer to the following arithmetic problem: {a} + {b} ="
        for a, b in ((3, 4), (12, 9), (7, 7), (1, 30), (25, 5), (9, 0))
    ]
    ref = reference.generate_reference(model, tok, prompts, max_new_tokens=24, batch_size=6, do_sample=False)
    for batch_size in (1, 4, 64):
        fast = sampling.generate(model, tok, prompts, max_new_tokens=24, batch_size=batch_size, do_sample=False)
        assert [g.response for g in fast] == [g.response for g in ref]
        assert [g.n_tokens for g in fast] == [g.n_tokens for g in ref]
        assert [g.finish_reason for g in fast] == [g.finish_reason for g in ref]
        for f, r in zip(fast, ref):
            assert f.mean_logprob == pytest.approx(r.mean_logprob, abs=1e-3)
            assert f.self_certainty == pytest.approx(r.self_certainty, abs=1e-3)


def test_cpu_fused_lm_head_scores_only_labelled_positions(monkeypatch):
    """DPO's and SFT's log-probs come from TRL's fused LM head. On the CPU flywheel makes it project
    only the positions that carry a label: the same log-probs and gradients from fewer rows."""
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    from flywheel.models.training import trainer

    # TRL's own choice to start from (an earlier training in this process switched it), restored after the test
    monkeypatch.setattr(trl_utils, "_use_triton", getattr(trl_utils._use_triton, "__wrapped__", trl_utils._use_triton))
    base = loading.resolve("embedded:smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trl_utils.add_fused_lm_head(model)
    _, tok = loading.load(base)
    rows = [tok(q + " " + r)["input_ids"] for q, r in zip(QUESTIONS, RESPONSES)]
    prompt = [len(tok(q)["input_ids"]) for q in QUESTIONS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    for i, p in enumerate(prompt):
        labels[i, :p] = -100
    projected = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction,
        "apply",
        lambda hidden, *a: projected.append(hidden.shape[0]) or apply(hidden, *a),
    )

    def log_probs_and_grad():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        return out.log_probs.detach(), model.model.layers[-1].mlp.down_proj.weight.grad.clone()

    every, every_grad = log_probs_and_grad()
    original = trl_utils._use_triton
    assert trainer.score_labelled_positions_only()
    assert trainer.score_labelled_positions_only(), "a second call keeps the switch"
    assert trl_utils._use_triton.__wrapped__ is original, "wrapped once, around TRL's own choice"
    from trl.kernels import chunked_logprob

    assert not chunked_logprob._use_triton(torch.device("cpu")), "TRL's kernels stay on torch ops on the CPU"
    labelled, labelled_grad = log_probs_and_grad()
    n_labels = int((labels[:, 1:] != -100).sum())
    assert projected == [ids.shape[0] * (width - 1), n_labels]
    assert n_labels < ids.shape[0] * (width - 1) / 2
    assert (labelled[labels[:, 1:] == -100] == 0).all()
    assert torch.allclose(labelled, every, atol=1e-5)
    assert torch.allclose(labelled_grad, every_grad, rtol=1e-4, atol=1e-6)


def test_decoder_and_judge_do_not_read_the_outputs_deprecated_cache_field(model_and_tokenizer, monkeypatch):
    """transformers deprecates a model output's `past_key_values` for removal (it warns and forwards
    to `cache`): with it gone, sampling, greedy decoding and the judge's shared prefixes give the same."""
    from transformers.utils.generic import ModelOutput

    model, tok = model_and_tokenizer
    sample = {"n": 2, "max_new_tokens": 12, "batch_size": 4, "do_sample": True, "temperature": 1.0, "seed": 5}
    greedy = {"max_new_tokens": 12, "batch_size": 4, "do_sample": False}
    judge = {"batch_size": 4, "max_prompt_tokens": 1024}
    before = [
        sampling.generate(model, tok, QUESTIONS, **sample),
        sampling.generate(model, tok, QUESTIONS, **greedy),
        reference.llm_judge(model, tok, load_rubric(), QUESTIONS, RESPONSES, **judge),
    ]

    def removed(self):
        raise AttributeError("past_key_values")

    monkeypatch.setattr(ModelOutput, "past_key_values", property(removed))
    assert [
        sampling.generate(model, tok, QUESTIONS, **sample),
        sampling.generate(model, tok, QUESTIONS, **greedy),
        reference.llm_judge(model, tok, load_rubric(), QUESTIONS, RESPONSES, **judge),
    ] == before


def test_a_transformers_that_ignores_the_cache_argument_fails_loudly(model_and_tokenizer, monkeypatch):
    """The decoder hands the model its own KV cache as `cache=`; were that argument ignored (renamed
    in some release), every row would decode without its prompt: it fails in one line instead."""
    from flywheel.errors import EngineError

    model, tok = model_and_tokenizer
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, cache=None, **kw: forward(*a, **kw))
    with pytest.raises(EngineError, match=r"ignored the KV cache passed as `cache=`"):
        sampling.generate(model, tok, QUESTIONS, max_new_tokens=4, batch_size=2, do_sample=False)
    with pytest.raises(EngineError, match=r"ignored the KV cache passed as `cache=`"):
        reference.llm_judge(model, tok, load_rubric(), QUESTIONS, RESPONSES, batch_size=4, max_prompt_tokens=1024)
