"""Bad input: a one-line error naming the problem, a non-zero exit, and nothing written."""

import json
import os
import subprocess
import sys

import pytest

FLYWHEEL = [sys.executable, "-m", "flywheel.flows.cli"]


@pytest.fixture
def run_cli(tmp_path, monkeypatch, capsys):
    """Run the CLI on `args` with a fresh workspace: by default main() in this process, which saves
    the 5-8 s of interpreter start and imports a process pays; with `in_a_process`, as a user's
    command runs (`python -m flywheel.flows.cli`: its exit code, its stderr, its sys.path)."""

    def run(args, in_a_process=False):
        ws = tmp_path / "ws"
        argv = [*args, "--workspace", str(ws)]
        if in_a_process:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLYWHEEL_CACHE": str(tmp_path / "cache")}
            return subprocess.run(
                [*FLYWHEEL, *argv], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
            ), ws
        from flywheel.flows import cli

        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("FLYWHEEL_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("PYTHONWARNINGS", raising=False)  # main() sets it for its subprocesses: undone after
        capsys.readouterr()
        rc = cli.main(argv)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, rc, out, err), ws

    return run


def _prompts(tmp_path, text):
    f = tmp_path / "prompts.jsonl"
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "0"], "rounds: Input should be greater than or equal to 1"),
        (["--samples", "1"], "sampling.n: Input should be greater than or equal to 2"),
        (["--task", "no_such_task"], "unknown reasoning-gym task 'no_such_task'"),
        (["--model", "./no/such/dir"], "model path './no/such/dir' is not a transformers checkpoint"),
        (["--model", "nobody/no-such-model-xyz"], "model 'nobody/no-such-model-xyz' is neither a local checkpoint"),
        (["--config", "missing.yaml"], "config file not found: missing.yaml"),
        # this machine has no vLLM (it is the [vllm] extra, for GPUs)
        (["--engine", "vllm"], "engine vllm needs vLLM: pip install 'flywheel[vllm]'"),
    ],
)
def test_bad_input_fails_cleanly(run_cli, tmp_path, args, message):
    p, ws = run_cli(["run", *args], in_a_process=args == ["--config", "missing.yaml"])
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("flywheel: error:")]
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not ws.exists(), "nothing may be written for bad input"
    # and found before the policy's weights are fetched or converted (minutes for a large model)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "has no prompts"),
        (json.dumps({"prompt": "ok"}) + "\n{broken\n", "prompts.jsonl:2: malformed JSON"),
    ],
)
def test_bad_prompts_file(run_cli, tmp_path, content, message):
    p, ws = run_cli(["run", "--prompts", _prompts(tmp_path, content)])
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert not ws.exists()


def test_sql_without_catalog(run_cli):
    p, _ = run_cli(["sql", "SELECT 1"])
    assert p.returncode == 2 and "no catalog" in p.stderr


@pytest.mark.parametrize(
    "config, files, message",
    [
        ("judge:\n  sources: [verifier, telepathy]\n", {}, "judge.sources.1: unknown type 'telepathy'"),
        (
            "curation:\n  reward: {verifier: 1.0, llm_judge: 0.5, majority_vote: 1.0}\n",
            {},
            "curation.reward names 'majority_vote', which is not among judge.sources",
        ),
        (
            "judge:\n  sources: [verifier, {type: llm_judge, template: rubric.txt}]\n",
            {"rubric.txt": "Rate it: {question}\n<|assistant|>\nScore: "},
            "lacks the {response} placeholder",
        ),
        (
            "judge:\n  sources: [verifier, {type: llm_judge, template: rubric.txt}]\n",
            {"rubric.txt": "Rate {question} / {response} from 0 to 5."},
            "lacks the verdict cue",
        ),
        (
            "judge:\n  sources: [verifier, {type: verifier, name: mine, match: callable, "
            "callable: 'nowhere_xyz:check'}]\n",
            {},
            "verifier callable 'nowhere_xyz:check' cannot be imported",
        ),
        (
            "judge:\n  sources: [verifier, {type: verifier, name: mine, match: callable, callable: 'checks:boom'}]\n",
            {"checks.py": "def boom(prompt, response, answer, metadata):\n    raise ValueError('bad check')\n"},
            "verifier callable 'checks:boom' failed on a probe item: ValueError: bad check",
        ),
        # training values are checked against TRL's config classes before any work
        ("train:\n  dpo: {lr_scheduler_type: sometimes}\n", {}, "train.dpo: sometimes is not a valid SchedulerType"),
        (
            "train:\n  dpo: {learning_rate: fast}\n",
            {},
            "train.dpo.learning_rate: 'fast': Input should be a valid number",
        ),
        (
            "train:\n  dpo: {per_device_train_batch_size: 0}\n",
            {},
            "train.dpo.per_device_train_batch_size: must be greater than 0, got 0",
        ),
        ("train:\n  dpo: {loss_type: [sigmoid, telepathy]}\n", {}, "train.dpo.loss_type: unknown loss 'telepathy'"),
        ("train:\n  sft: {num_train_epochs: -2}\n", {}, "train.sft.num_train_epochs: must be greater than 0"),
        # settings that resume and lineage depend on are flywheel's, not TRL's
        ("train:\n  dpo: {output_dir: /tmp/elsewhere}\n", {}, "train.dpo: output_dir is set by flywheel, not here"),
        ("train:\n  sft: {seed: 7}\n", {}, "train.sft: seed is set by flywheel, not here"),
        # a training job's Accelerate config: missing, not YAML, not an Accelerate config
        ("train:\n  accelerate_config: nowhere.yaml\n", {}, "train.accelerate_config: Accelerate config not found"),
        (
            "train:\n  accelerate_config: acc.yaml\n",
            {"acc.yaml": "distributed_type: [MULTI_GPU\n"},
            "Accelerate config acc.yaml is not valid YAML",
        ),
        (
            "train:\n  accelerate_config: acc.yaml\n",
            {"acc.yaml": "num_processes: 8\n"},
            "Accelerate config acc.yaml is not one (no distributed_type",
        ),
        # a stage on a work pool needs a Prefect server (this test environment names none)
        (
            "stages:\n  train: {work_pool: gpu}\n",
            {},
            "stages.train.work_pool is set, but no Prefect server is configured: set PREFECT_API_URL",
        ),
        ("stages:\n  train: {job_variables: {env: {A: b}}}\n", {}, "job_variables need a work_pool"),
    ],
)
def test_bad_config_values_fail_before_generation(run_cli, tmp_path, config, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "c.yaml").write_text(config)
    # In a process of its own: a callable in the working directory (importable only where that
    # directory is on the path), and the work pool without a Prefect server (this test process may
    # have one configured by an earlier test's harness).
    p, ws = run_cli(["run", "--config", "c.yaml"], in_a_process="checks:" in config or "work_pool:" in config)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("flywheel: error:")]
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr and not ws.exists()


def test_lm_eval_suites_without_lm_eval_installed_fail_in_one_line(tmp_path):
    """The test extra installs lm-eval; a user's plain install does not: hide it, as a missing package."""
    (tmp_path / "c.yaml").write_text("benchmark:\n  lm_eval: {tasks: [arc_easy]}\n")
    hide = (
        "import sys; sys.modules['lm_eval'] = None; from flywheel.flows.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    ws = tmp_path / "ws"
    p = subprocess.run(
        [sys.executable, "-c", hide, "run", "--config", "c.yaml", "--workspace", str(ws)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "FLYWHEEL_CACHE": str(tmp_path / "cache")},
    )
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("flywheel: error:")]
    assert len(lines) == 1 and "benchmark.lm_eval needs lm-evaluation-harness: pip install -e '.[eval]'" in lines[0], (
        p.stderr
    )
    assert "Traceback" not in p.stderr and not ws.exists()
    assert not (tmp_path / "cache").exists(), "the check comes before the policy's weights are converted"


def usage_error(capsys, argv) -> str:
    """The one line a usage error prints (after asserting it is the only one, with exit code 2)."""
    from flywheel.flows import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("flywheel: error:"), err
    return err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        # a negative limit would slice off the last rows (rows[:-1]), zero would show none
        (["data", "show", "pairs", "--limit", "-1"], "argument --limit: expected a positive whole number, got '-1'"),
        (["data", "show", "pairs", "--limit", "0"], "argument --limit: expected a positive whole number, got '0'"),
        (["data", "show", "pairs", "--limit", "many"], "argument --limit: expected a positive whole number"),
        # a run id names a folder under <workspace>/runs/, never a path out of it
        (["run", "--resume", "../x"], "argument --resume: '../x' is not a run id"),
        (["run", "--resume", "/etc"], "argument --resume: '/etc' is not a run id"),
        (["run", "--resume", "a/../../b"], "argument --resume: 'a/../../b' is not a run id"),
        (["run", "--resume", "a..b"], "argument --resume: 'a..b' is not a run id"),
        (["run", "--resume", ".hidden"], "argument --resume: '.hidden' is not a run id"),
        (["run", "--resume", ""], "argument --resume: '' is not a run id"),
        (["data", "show", "pairs", "--run", "../x"], "argument --run: '../x' is not a run id"),
        (["export", "sft", "--run", "..", "--to", "out"], "argument --run: '..' is not a run id"),
        (["compare", "20260101-000000-abcdef", "../x"], "argument RUN: '../x' is not a run id"),
        (["run", "--task-option", "max_digits=[1,"], "argument --task-option: max_digits: '[1,' is not a YAML value"),
        (["run", "--engine", "telepathy"], "argument --engine: invalid choice: 'telepathy'"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    line = usage_error(capsys, [*argv, "--workspace", str(ws)])
    assert message in line and line.endswith("-h`)"), line
    assert not ws.exists() and not (tmp_path / "out").exists()


def test_resume_does_not_read_a_config_outside_runs(capsys, tmp_path):
    """`--resume ../x` would read <workspace>/x/config.yaml, a file no run of the workspace wrote."""
    ws = tmp_path / "ws"
    (ws / "runs").mkdir(parents=True)
    (ws / "x").mkdir()
    (ws / "x" / "config.yaml").write_text("rounds: 1\n")
    line = usage_error(capsys, ["run", "--resume", "../x", "--workspace", str(ws)])
    assert "'../x' is not a run id" in line
    assert sorted(p.name for p in ws.rglob("*")) == ["config.yaml", "runs", "x"]


def test_run_ids_the_cli_makes_are_accepted():
    from flywheel.flows import cli
    from flywheel.flows.flywheel import new_run_id

    for run_id in (new_run_id(), "20260101-000000-abcdef", "my_run.v2"):
        args = cli.build_parser().parse_args(["run", "--resume", run_id])
        assert args.resume == run_id
    assert cli.build_parser().parse_args(["data", "show", "pairs", "--limit", "3"]).limit == 3


def test_a_multi_line_message_is_printed_as_one_line(run_cli, tmp_path):
    """A key or value quoted from the user's file may hold line breaks: escaped, never a second line."""
    (tmp_path / "c.yaml").write_text('"bad\\nkey": 1\n')
    p, ws = run_cli(["run", "--config", "c.yaml"])
    assert p.returncode == 2 and p.stderr.splitlines() == [
        "flywheel: error: bad\\nkey: Extra inputs are not permitted"
    ], p.stderr
    assert not ws.exists()


def test_the_preset_help_names_every_shipped_preset():
    from flywheel.config import presets
    from flywheel.flows import cli

    run = cli.build_parser()._subparsers._group_actions[0].choices["run"]
    preset = next(a for a in run._actions if "--preset" in a.option_strings)
    assert {"default", "label_free", "star"} <= set(presets())
    assert all(name in preset.help for name in presets()), preset.help
