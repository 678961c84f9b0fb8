"""The round is a loop over registered stages: their order, their fingerprints (which resumed
runs' manifests are keyed by) and how a new stage joins."""

import pytest

from flywheel.config import FlywheelConfig
from flywheel.tasks import stage
from flywheel.tasks.common import short_hash
from flywheel.tasks.promote import Champion


def state(round_=1):
    champ = Champion("ckpt/champ", 0, 0.5, 10.0)
    return stage.RoundState(
        FlywheelConfig(), round_, "ckpt/policy", "ckpt/base", "ckpt/prev", "ckpt/ref", champion=champ
    )


def test_the_round_runs_its_stages_in_order_and_promotion_is_one():
    assert stage.names() == ("generate", "judge", "curate", "train", "benchmark", "promote")
    assert [s.name for s in stage.stages() if s.baseline] == ["benchmark"], "round 0 only benchmarks"
    assert not stage.get("promote").placeable


def test_fingerprints_chain_as_resumed_runs_expect():
    """A run made before stages were registered must resume: each stage's fingerprint is the one
    its manifest was written under."""
    s, cfg = state(), FlywheelConfig()
    fps, fp = {}, None
    for st in stage.stages():
        fp = fps[st.name] = st.fingerprint(fp, s)
        if st.name == "train":
            s.policy_out = "ckpt/out"
    gen = short_hash("generate", cfg.hash(), 1, "ckpt/policy")
    judge = short_hash("judge", gen, "ckpt/prev", "ckpt/ref")
    curate = short_hash("curate", judge)
    train = short_hash("train", curate, "ckpt/base")
    assert [fps[k] for k in ("generate", "judge", "curate", "train", "benchmark")] == [
        gen,
        judge,
        curate,
        train,
        short_hash("benchmark", train),
    ]
    zero = stage.RoundState(cfg, 0, "ckpt/base", "ckpt/base")
    assert stage.get("benchmark").fingerprint(None, zero) == short_hash("benchmark", cfg.hash(), 0, "ckpt/base")
    assert stage.get("benchmark").params(s) == {"policy": "ckpt/out"}, "the round's model is benchmarked"
    # the judge ranks with the previous policy only when it differs from this round's
    s.previous = s.policy
    assert stage.get("judge").params(s)["previous"] is None


def test_a_new_stage_is_one_registration(monkeypatch):
    monkeypatch.setattr(stage, "_REGISTRY", dict(stage._REGISTRY))
    stage.stages()  # the built-in ones first
    extra = stage.register(stage.Stage("filter", 35, task=None, fingerprint=lambda fp, s: short_hash("filter", fp)))
    assert stage.names() == ("generate", "judge", "curate", "filter", "train", "benchmark", "promote")
    assert stage.get("filter") is extra
    with pytest.raises(ValueError, match="registered twice"):
        stage.register(stage.Stage("filter", 36, task=None, fingerprint=extra.fingerprint))
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        stage.get("nope")


def test_any_placeable_stage_can_be_sent_to_a_work_pool(monkeypatch, tmp_path):
    """A registered stage has no field of its own in `stages:`, yet is placed under its name; a
    name that is no stage, or a stage that runs in the round's process, fails before any work."""
    from flywheel.config import load_config
    from flywheel.errors import ConfigError
    from flywheel.flows.flywheel import check

    monkeypatch.setattr(stage, "_REGISTRY", dict(stage._REGISTRY))
    stage.stages()
    stage.register(stage.Stage("nonempty", 35, task=None, fingerprint=lambda fp, s: short_hash("nonempty", fp)))
    cfg = load_config(None, {"workspace": str(tmp_path), "stages": {"nonempty": {"work_pool": "gpu"}}})
    assert cfg.stages.placed() == {"nonempty": cfg.stages.placement("nonempty")}
    assert cfg.stages.placement("nonempty").work_pool == "gpu" and cfg.stages.placement("judge").work_pool is None
    assert cfg.hash() == load_config(None, {}).hash(), "where a stage runs is not hashed"
    for name, message in (("nonemtpy", "nonemtpy is not a stage"), ("promote", "promote runs in the round's own")):
        bad = load_config(None, {"workspace": str(tmp_path), "stages": {name: {"work_pool": "gpu"}}})
        with pytest.raises(ConfigError, match=f"stages.{name}.work_pool: {message}"):
            check(bad)
