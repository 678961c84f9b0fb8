"""The decoder against a checkpoint's generation_config: the embedded model copied (weights linked)
with its generation_config.json edited, decoded by flywheel's decoder and by transformers' generate()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import GenerationConfig

from flywheel.errors import EngineError
from flywheel.models import loading
from flywheel.models.hf import decode, reference, sampling

PROMPTS = [
    "State the final answer to the following arithmetic problem: 3 + 4 =",
    "State the final answer to the following arithmetic problem: 12 + 9 =",
]


@pytest.fixture(scope="module")
def base() -> str:
    return loading.resolve("embedded:smollm2-135m-instruct")


def edited(base: str, where: Path, **settings) -> str:
    """A copy of the checkpoint `base` whose generation_config.json also sets `settings`."""
    where.mkdir()
    for f in Path(base).iterdir():
        if f.name != "generation_config.json":
            (where / f.name).symlink_to(f)
    config = json.loads((Path(base) / "generation_config.json").read_text())
    (where / "generation_config.json").write_text(json.dumps(config | settings))
    return str(where)


def greedy_tokens(model, tok, prompts, max_new_tokens=16) -> list[list[int]]:
    ids = tok(sampling.chat_texts(tok, prompts), add_special_tokens=False)["input_ids"]
    rows = decode.decode(
        model,
        ids,
        n=1,
        max_new_tokens=max_new_tokens,
        batch_size=4,
        do_sample=False,
        eos_ids={tok.eos_token_id},
        pad_id=tok.pad_token_id,
    )
    return [r.tokens for r in rows]


def test_a_row_ends_on_any_eos_id_of_the_generation_config(base, tmp_path):
    """Llama-3 style: generation_config.eos_token_id lists several ids; a row ends on the first of any."""
    model, tok = loading.load(base)
    plain = greedy_tokens(model, tok, PROMPTS)
    # a token the first answer emits early, at its first occurrence, that is no end-of-sequence token
    k = next(i for i, t in enumerate(plain[0]) if i >= 2 and t not in plain[0][:i] and t != tok.eos_token_id)
    stop = plain[0][k]
    model, tok = loading.load(edited(base, tmp_path / "m", eos_token_id=[tok.eos_token_id, stop]))
    ends = [next((i + 1 for i, t in enumerate(row) if t in (stop, tok.eos_token_id)), len(row)) for row in plain]
    assert ends[0] == k + 1 < len(plain[0])
    assert greedy_tokens(model, tok, PROMPTS) == [row[:n] for row, n in zip(plain, ends)]
    fast = sampling.generate(model, tok, PROMPTS, max_new_tokens=16, batch_size=2, do_sample=False)
    assert fast[0].finish_reason == "stop" and fast[0].n_tokens == k + 1
    ref = reference.generate_reference(model, tok, PROMPTS, max_new_tokens=16, batch_size=2, do_sample=False)
    assert [(g.response, g.n_tokens, g.finish_reason) for g in fast] == [
        (g.response, g.n_tokens, g.finish_reason) for g in ref
    ]


def test_a_setting_the_decoder_does_not_apply_is_refused_in_one_line(base, tmp_path):
    model, tok = loading.load(edited(base, tmp_path / "m", repetition_penalty=1.3))
    with pytest.raises(
        EngineError,
        match=r"generation_config sets repetition_penalty=1\.3, which flywheel's "
        r"decoder does not apply",
    ) as e:
        sampling.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=2, do_sample=False)
    assert "\n" not in str(e.value) and str(tmp_path / "m") in str(e.value)


@pytest.mark.parametrize(
    "setting",
    [
        {"no_repeat_ngram_size": 3},
        {"bad_words_ids": [[42]]},
        {"min_new_tokens": 5},
        {"suppress_tokens": [42]},
        {"sequence_bias": [[[42], -5.0]]},
        {"forced_eos_token_id": 2},
        {"num_beams": 4},
        {"stop_strings": ["7"]},
        {"encoder_repetition_penalty": 1.2},
    ],
)
def test_each_unapplied_processor_is_named(base, setting):
    model, tok = loading.load(base)
    kept = model.generation_config
    model.generation_config = GenerationConfig(**(kept.to_dict() | setting))
    try:
        with pytest.raises(EngineError, match=f"generation_config sets {next(iter(setting))}="):
            sampling.generate(model, tok, PROMPTS, n=2, max_new_tokens=8, batch_size=4, do_sample=True, seed=1)
    finally:
        model.generation_config = kept


def test_a_checkpoints_sampling_suggestions_do_not_change_flywheels_sampling(base, tmp_path):
    """Every engine samples the config's temperature and top_p from the plain distribution; a
    checkpoint's suggested warpers (and neutral processor values) change neither the decoder's
    samples nor generate()'s."""
    kw = {"max_new_tokens": 12, "batch_size": 4, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "seed": 3}
    model, tok = loading.load(base)
    fast = sampling.generate(model, tok, PROMPTS, n=2, **kw)
    ref = reference.generate_reference(model, tok, PROMPTS, **kw)
    suggests = {
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.2,
        "typical_p": 0.5,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
    }
    model, tok = loading.load(edited(base, tmp_path / "m", **suggests))
    assert model.generation_config.min_p == 0.2
    assert sampling.generate(model, tok, PROMPTS, n=2, **kw) == fast
    assert reference.generate_reference(model, tok, PROMPTS, **kw) == ref
