"""Run lifecycle without a model: the promotion gate, the champion across rounds, the workspace
lock, and the checks that fail a run before any work."""

import errno
import os
import subprocess
import sys

import pytest

from flywheel.config import PromotionConfig
from flywheel.flows.flywheel import _replay
from flywheel.storage import lock
from flywheel.tasks.promote import Champion, decide

CHAMP = Champion("m0", 0, accuracy=0.30, mean_tokens=10.0, guards={"basic_arithmetic": 0.40}, validation=0.50)


def metrics(acc, tokens=10.0, guard=0.40, test=0.99):
    """A round's figures: `acc` on the validation split decides; the test split (`test`) never does."""
    return {
        "accuracy": test,
        "exact_match": test,
        "mean_response_tokens": tokens,
        "validation_exact_match": acc,
        "validation_mean_response_tokens": tokens,
        "guard_accuracy.basic_arithmetic": guard,
        "guard_limits": {"basic_arithmetic": 0.05},
    }


@pytest.mark.parametrize(
    "m, cfg, promoted, why",
    [
        (
            metrics(0.55),
            PromotionConfig(),
            True,
            "validation exact match 55.0% vs champion (round 0) 50.0%: +5.0 points",
        ),
        (metrics(0.50), PromotionConfig(), True, "+0.0 points, needs ≥ +0.0"),
        (
            metrics(0.49),
            PromotionConfig(),
            False,
            "validation exact match 49.0% vs champion (round 0) 50.0%: -1.0 points",
        ),
        # the test split is reported, never decided on: a test score far above the champion's changes nothing
        (metrics(0.49, test=0.99), PromotionConfig(), False, "-1.0 points"),
        (metrics(0.52), PromotionConfig(min_improvement=0.05), False, "needs ≥ +5.0"),
        (
            metrics(0.60, tokens=30.0),
            PromotionConfig(max_length_growth=0.5),
            False,
            "mean length 30.0 vs 10.0 tokens: +200% (+20.0 tokens), limit +50% or +16 tokens",
        ),
        # short answers may grow by a few words: +100% is +10 tokens, within the 16-token slack
        (metrics(0.60, tokens=20.0), PromotionConfig(), True, "mean length 20.0 vs 10.0 tokens: +100% (+10.0 tokens)"),
        (metrics(0.60, tokens=16.0), PromotionConfig(length_slack_tokens=0), False, "+60% (+6.0 tokens)"),
        (metrics(0.60, tokens=30.0), PromotionConfig(max_length_growth=None), True, "validation exact match 60.0%"),
        (
            metrics(0.60, guard=0.30),
            PromotionConfig(),
            False,
            "guard basic_arithmetic 30.0% vs the starting model's 40.0%: -10.0 points",
        ),
        (
            metrics(0.60, guard=0.37),
            PromotionConfig(),
            True,
            "guard basic_arithmetic 37.0% vs the starting model's 40.0%",
        ),
    ],
)
def test_promotion_gate(m, cfg, promoted, why):
    ok, reasons = decide(m, CHAMP, cfg, trained=True)
    assert ok is promoted
    assert any(why in r for r in reasons), reasons


def test_long_answers_are_held_to_the_share_not_the_slack():
    long_champ = Champion("m0", 0, accuracy=0.30, mean_tokens=200.0, guards={"basic_arithmetic": 0.40}, validation=0.50)
    ok, _ = decide(metrics(0.60, tokens=280.0), long_champ, PromotionConfig(), trained=True)
    assert ok  # +40%, though +80 tokens is far past the 16-token slack
    ok, reasons = decide(metrics(0.60, tokens=320.0), long_champ, PromotionConfig(), trained=True)
    assert not ok and any("+60% (+120.0 tokens)" in r for r in reasons), reasons


def test_guards_are_held_to_the_starting_model_not_the_champion():
    start = {
        "accuracy": 0.3,
        "mean_response_tokens": 10.0,
        "validation_exact_match": 0.5,
        "guard_accuracy.basic_arithmetic": 0.40,
    }
    # a champion that rose on the guard by chance: falling back to the start's level is no drop
    lucky = Champion.of("m2", 2, {**start, "guard_accuracy.basic_arithmetic": 0.47}, start)
    ok, reasons = decide(metrics(0.60, guard=0.39), lucky, PromotionConfig(), trained=True)
    assert ok, reasons
    # drops that each pass against the champion before them cannot add up: -3 then -3 is -6 from the start
    slipped = Champion.of("m1", 1, {**start, "guard_accuracy.basic_arithmetic": 0.37}, start)
    ok, reasons = decide(metrics(0.60, guard=0.34), slipped, PromotionConfig(), trained=True)
    assert not ok and "34.0% vs the starting model's 40.0%: -6.0 points, limit −5.0" in reasons[0], reasons
    # and _replay keeps round 0's guards as the baseline for every later champion
    history = [
        {"round": 0, "policy_out": "base", "policy_in": "base", "promoted": True, "reference_model": None, **start},
        {
            "round": 1,
            "policy_out": "m1",
            "policy_in": "base",
            "promoted": True,
            "reference_model": "base",
            **start,
            "guard_accuracy.basic_arithmetic": 0.47,
        },
    ]
    champion = _replay(history, "base")[0]
    assert champion.guards == {"basic_arithmetic": 0.47} and champion.baseline_guards == {"basic_arithmetic": 0.40}
    # the champion crosses into the round flow as a dict (a Prefect parameter) and back
    assert Champion(**champion.__dict__) == champion


def test_a_guard_drop_blocks_only_when_its_interval_is_below_zero_by_default():
    # −6 points past a 5-point limit, but the paired interval reaches 0: noise, not a drop
    noisy = {
        **metrics(0.60, guard=0.34),
        "guard_change.basic_arithmetic.accuracy_gain_low": -0.15,
        "guard_change.basic_arithmetic.accuracy_gain_high": 0.02,
    }
    ok, reasons = decide(noisy, CHAMP, PromotionConfig(), trained=True)
    assert ok and any("-6.0 points, 95% interval [-15.0, +2.0], limit −5.0 (within noise" in r for r in reasons), (
        reasons
    )
    # the same drop with its interval below 0 blocks
    real = {**noisy, "guard_change.basic_arithmetic.accuracy_gain_high": -0.01}
    ok, reasons = decide(real, CHAMP, PromotionConfig(), trained=True)
    assert not ok and reasons == [
        "guard basic_arithmetic 34.0% vs the starting model's 40.0%: -6.0 points, "
        "95% interval [-15.0, -1.0], limit −5.0"
    ], reasons
    # guard_rule: point decides on the difference alone
    ok, reasons = decide(noisy, CHAMP, PromotionConfig(guard_rule="point"), trained=True)
    assert not ok and "within noise" not in reasons[0]
    # a significant drop inside the limit passes under both rules
    small = {
        **metrics(0.60, guard=0.37),
        "guard_change.basic_arithmetic.accuracy_gain_low": -0.06,
        "guard_change.basic_arithmetic.accuracy_gain_high": -0.01,
    }
    assert decide(small, CHAMP, PromotionConfig(), trained=True)[0]
    assert decide(small, CHAMP, PromotionConfig(guard_rule="point"), trained=True)[0]


def test_untrained_round_is_never_promoted():
    ok, reasons = decide(metrics(0.9), CHAMP, PromotionConfig(), trained=False)
    assert not ok and "no model was trained" in reasons[0]


def test_champion_and_streak_follow_the_rounds():
    def r(k, acc, promoted, ref="base"):
        return {
            "round": k,
            "accuracy": acc,
            "mean_response_tokens": 10.0,
            "promoted": promoted,
            "policy_in": f"m{k - 1}",
            "policy_out": f"m{k}",
            "reference_model": ref,
        }

    history = [
        {
            "round": 0,
            "accuracy": 0.4,
            "mean_response_tokens": 10.0,
            "promoted": True,
            "policy_in": "base",
            "policy_out": "base",
            "reference_model": None,
        },
        r(1, 0.5, True),
        r(2, 0.45, False),
        r(3, 0.44, False),
    ]
    champion, refs, previous, since = _replay(history, "base")
    assert (champion.policy, champion.round, champion.accuracy) == ("m1", 1, 0.5)
    assert since == 2 and previous == "m2" and refs["m1"] == "base" and refs["base"] is None


def _cli(tmp_path, *args, env=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    e.pop("MLFLOW_TRACKING_URI", None)
    if env and "MLFLOW_TRACKING_URI" in env:
        e["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    return subprocess.run(
        [sys.executable, "-m", "flywheel.flows.cli", *args],
        capture_output=True,
        text=True,
        env=e,
        cwd=tmp_path,
        timeout=300,
    )


def _one_error_line(p):
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("flywheel: error:")]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def test_a_second_run_on_a_busy_workspace_is_refused(tmp_path):
    ws = tmp_path / "ws"
    with lock.workspace_lock(ws):
        p = _cli(tmp_path, "run", "--workspace", str(ws), "--rounds", "1")
        assert "is in use by another flywheel run (pid " in _one_error_line(p)
    assert not (ws / "tables").exists() and not (ws / "mlflow.db").exists()
    with lock.workspace_lock(ws):  # released when its holder is done
        pass


def test_read_only_workspace_fails_before_work(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: a read-only bind is what a user sees; simulate with a file in the way
        ws = tmp_path / "ws"
        ws.write_text("not a directory")
    else:
        ws = tmp_path / "ro"
        ws.mkdir()
        ws.chmod(0o500)
    p = _cli(tmp_path, "run", "--workspace", str(ws), "--rounds", "1")
    assert f"workspace {ws} is not writable" in _one_error_line(p)


def test_unreachable_mlflow_store_fails_before_work(tmp_path):
    ws = tmp_path / "ws"
    uri = "http://flywheel:s3cret@127.0.0.1:9"  # nothing listens on port 9
    p = _cli(
        tmp_path,
        "run",
        "--workspace",
        str(ws),
        "--rounds",
        "1",
        env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"},
    )
    line = _one_error_line(p)
    assert "MLflow tracking store http://***@127.0.0.1:9 is unreachable" in line
    assert "s3cret" not in p.stderr and "s3cret" not in p.stdout, "credentials never reach the logs"
    assert not (ws / "tables").exists()


def test_unknown_resume_and_stage(tmp_path):
    p = _cli(tmp_path, "run", "--workspace", str(tmp_path / "ws"), "--resume", "20990101-nope")
    assert "no run '20990101-nope'" in _one_error_line(p)
    p = _cli(tmp_path, "run", "--resume", "x", "--force-from-stage", "dance")
    assert p.returncode == 2 and "invalid choice: 'dance'" in p.stderr


def test_nearly_full_disk_fails_preflight(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from flywheel.flows import flywheel as fw

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 300 * 2**20, 300 * 2**20))
    with pytest.raises(OSError, match=r"has only 300 MiB free; a round needs about 2048 MiB"):
        fw.preflight(tmp_path / "ws")
    assert not list((tmp_path / "ws").iterdir()), "the probe file is gone"
    # the need scales with the model: 8 GiB free is plenty for the 135M model, not for a 7B one (14 GiB in bf16)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100 * 2**30, 92 * 2**30, 8 * 2**30))
    fw.preflight(tmp_path / "ws", model_bytes=540 * 2**20)
    with pytest.raises(OSError, match=r"has only 8192 MiB free; a round needs about 44032 MiB .*for a 14.0 GiB model"):
        fw.preflight(tmp_path / "ws", model_bytes=14 * 2**30)
    # a registry that copies each round's weights needs one model more
    with pytest.raises(OSError, match=r"a round needs about 58368 MiB"):
        fw.preflight(tmp_path / "ws", model_bytes=14 * 2**30, registry_copy=True)


def _requests_error():
    import requests

    return requests.exceptions.ConnectionError("MLflow server went away")


@pytest.mark.parametrize(
    "error, retried",
    [
        (OSError(errno.EIO, "disk hiccup"), True),
        (OSError(errno.ESTALE, "stale NFS handle"), True),
        (ConnectionError("reset"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (TimeoutError("slow nfs"), True),
        (_requests_error(), True),
        (FileNotFoundError(errno.ENOENT, "no such file"), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (IsADirectoryError(errno.EISDIR, "is a directory"), False),
        (OSError("no errno: unknown cause"), False),
        (OSError(errno.ENOSPC, "disk full"), False),
        (ValueError("a bug"), False),
        (KeyError("a bug"), False),
    ],
)
def test_only_transient_failures_are_retried(error, retried):
    from flywheel.flows.flywheel import _retry_transient

    class State:
        def result(self):
            raise error

    assert _retry_transient(None, None, State()) is retried


def test_a_stage_timeout_is_not_retried():
    from prefect.task_engine import TaskRunTimeoutError

    from flywheel.flows.flywheel import _retry_transient

    class State:
        def result(self):
            raise TaskRunTimeoutError("Scope timed out after 1 second(s).")

    assert _retry_transient(None, None, State()) is False


def _git(cwd, *args):
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_code_version_records_exactly_what_ran(tmp_path):
    from flywheel.flows.flywheel import PACKAGE_ROOT, code_version

    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "--quiet", str(PACKAGE_ROOT), str(clone))
    head = _git(clone, "rev-parse", "--short=12", "HEAD")
    assert code_version(clone) == f"0.1.0+g{head}"
    (clone / "config.py").write_text((clone / "config.py").read_text() + "\n# a local edit\n")
    code_version.cache_clear()
    assert code_version(clone) == f"0.1.0+g{head}.dirty", "a modified tracked file marks the version dirty"


def test_code_version_ignores_an_unrelated_repository_around_an_installed_copy(tmp_path):
    from flywheel.flows.flywheel import code_version

    outer = tmp_path / "someone-elses-project"
    (outer / "venv" / "site-packages" / "flywheel").mkdir(parents=True)
    _git(outer, "init", "--quiet")
    (outer / "README").write_text("x")
    _git(outer, "add", "README")
    _git(outer, "commit", "--quiet", "-m", "theirs")
    theirs = _git(outer, "rev-parse", "--short=12", "HEAD")
    version = code_version(outer / "venv" / "site-packages" / "flywheel")
    assert theirs not in version and version.startswith("0.1.0")


_TRY_LOCK = (
    "import sys\nfrom flywheel.storage import lock\ntry:\n    with lock.workspace_lock(sys.argv[1]):\n"
    "        pass\nexcept lock.WorkspaceBusy:\n    sys.exit(3)\n"
)


def test_the_lock_is_reentrant_in_its_process_and_exclusive_across_processes(tmp_path):
    ws = tmp_path / "ws"
    other = lambda: subprocess.run([sys.executable, "-c", _TRY_LOCK, str(ws)], timeout=60).returncode  # noqa: E731
    with lock.workspace_lock(ws):
        with lock.workspace_lock(ws):  # the flow inside the CLI takes it again
            assert lock.held(ws) and other() == 3
        assert lock.held(ws) and other() == 3, "leaving the inner hold must not release the outer one"
    assert not lock.held(ws) and other() == 0


def test_the_cli_holds_the_lock_from_its_checks_to_the_end_of_the_flow(tmp_path, monkeypatch, prefect_harness):
    from flywheel.flows import cli
    from flywheel.flows import flywheel as fw

    ws = tmp_path / "ws"
    seen = []

    def flow(config, resume=None, force_from_stage=None, run_id=None):
        seen.append(subprocess.run([sys.executable, "-c", _TRY_LOCK, str(ws)], timeout=60).returncode)
        return {
            "run_id": "r",
            "mlflow_run_id": "m",
            "champion": "base",
            "champion_accuracy": 0.5,
            "rounds": [{"round": 0, "accuracy": 0.5, "promoted": True}],
        }

    monkeypatch.setattr(fw, "flywheel", flow)
    monkeypatch.setattr(fw, "check", lambda *a, **k: seen.append("checked"))
    assert cli.main(["run", "--workspace", str(ws), "--rounds", "1"]) == 0
    assert seen == ["checked", 3], "while the flow ran, a second run was refused"
    assert not lock.held(ws)


def test_resume_skips_a_checkpoint_that_was_still_being_written(tmp_path):
    """A training killed while saving leaves a checkpoint without trainer_state.json (transformers
    writes it last): the rerun resumes from the newest complete one, not from the torn one."""
    from flywheel.models.training.trainer import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "absent") is None
    folder = tmp_path / "trainer"
    for step, complete in ((1, True), (2, True), (10, False)):
        d = folder / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(folder) == str(folder / "checkpoint-2")  # 2 < 10 numerically, 10 is torn
    (folder / "checkpoint-10" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(folder) == str(folder / "checkpoint-10")
