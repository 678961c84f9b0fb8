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
            return subprocess.run([*FLYWHEEL, *argv], capture_output=True, text=True, env=env, timeout=300,
                                  cwd=tmp_path), ws
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


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "rounds: Input should be greater than or equal to 1"),
    (["--samples", "1"], "sampling.n: Input should be greater than or equal to 2"),
    (["--task", "no_such_task"], "unknown reasoning-gym task 'no_such_task'"),
    (["--model", "./no/such/dir"], "model path './no/such/dir' is not a transformers checkpoint"),
    (["--model", "nobody/no-such-model-xyz"], "model 'nobody/no-such-model-xyz' is neither a local checkpoint"),
    (["--config", "missing.yaml"], "config file not found: missing.yaml"),
    # this machine has no vLLM (it is the [vllm] extra, for GPUs)
    (["--engine", "vllm"], "engine vllm needs vLLM: pip install 'flywheel[vllm]'"),
])
def test_bad_input_fails_cleanly(run_cli, tmp_path, args, message):
    p, ws = run_cli(["run", *args], in_a_process=args == ["--config", "missing.yaml"])
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("flywheel: error:")]
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not ws.exists(), "nothing may be written for bad input"
    # and found before the policy's weights are fetched or converted (minutes for a large model)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("content, message", [
    ("", "has no prompts"),
    (json.dumps({"prompt": "ok"}) + "\n{broken\n", "prompts.jsonl:2: malformed JSON"),
])
def test_bad_prompts_file(run_cli, tmp_path, content, message):
    p, ws = run_cli(["run", "--prompts", _prompts(tmp_path, content)])
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert not ws.exists()


def test_sql_without_catalog(run_cli):
    p, _ = run_cli(["sql", "SELECT 1"])
    assert p.returncode == 2 and "no catalog" in p.stderr


@pytest.mark.parametrize("config, files, message", [
    ("judge:\n  sources: [verifier, telepathy]\n", {}, "judge.sources.1: unknown type 'telepathy'"),
    ("curation:\n  reward: {verifier: 1.0, llm_judge: 0.5, majority_vote: 1.0}\n", {},
     "curation.reward names 'majority_vote', which is not among judge.sources"),
    ("judge:\n  sources: [verifier, {type: llm_judge, template: rubric.txt}]\n",
     {"rubric.txt": "Rate it: {question}\n<|assistant|>\nScore: "}, "lacks the {response} placeholder"),
    ("judge:\n  sources: [verifier, {type: llm_judge, template: rubric.txt}]\n",
     {"rubric.txt": "Rate {question} / {response} from 0 to 5."}, "lacks the verdict cue"),
    ("judge:\n  sources: [verifier, {type: verifier, name: mine, match: callable, callable: 'nowhere_xyz:check'}]\n",
     {}, "verifier callable 'nowhere_xyz:check' cannot be imported"),
    ("judge:\n  sources: [verifier, {type: verifier, name: mine, match: callable, callable: 'checks:boom'}]\n",
     {"checks.py": "def boom(prompt, response, answer, metadata):\n    raise ValueError('bad check')\n"},
     "verifier callable 'checks:boom' failed on a probe item: ValueError: bad check"),
    # training values are checked against TRL's config classes before any work
    ("train:\n  dpo: {lr_scheduler_type: sometimes}\n", {}, "train.dpo: sometimes is not a valid SchedulerType"),
    ("train:\n  dpo: {learning_rate: fast}\n", {}, "train.dpo.learning_rate: 'fast': Input should be a valid number"),
    ("train:\n  dpo: {per_device_train_batch_size: 0}\n", {},
     "train.dpo.per_device_train_batch_size: must be greater than 0, got 0"),
    ("train:\n  dpo: {loss_type: [sigmoid, telepathy]}\n", {}, "train.dpo.loss_type: unknown loss 'telepathy'"),
    ("train:\n  sft: {num_train_epochs: -2}\n", {}, "train.sft.num_train_epochs: must be greater than 0"),
    # settings that resume and lineage depend on are flywheel's, not TRL's
    ("train:\n  dpo: {output_dir: /tmp/elsewhere}\n", {}, "train.dpo: output_dir is set by flywheel, not here"),
    ("train:\n  sft: {seed: 7}\n", {}, "train.sft: seed is set by flywheel, not here"),
    # a training job's Accelerate config: missing, not YAML, not an Accelerate config
    ("train:\n  accelerate_config: nowhere.yaml\n", {}, "train.accelerate_config: Accelerate config not found"),
    ("train:\n  accelerate_config: acc.yaml\n", {"acc.yaml": "distributed_type: [MULTI_GPU\n"},
     "Accelerate config acc.yaml is not valid YAML"),
    ("train:\n  accelerate_config: acc.yaml\n", {"acc.yaml": "num_processes: 8\n"},
     "Accelerate config acc.yaml is not one (no distributed_type"),
    # a stage on a work pool needs a Prefect server (this test environment names none)
    ("stages:\n  train: {work_pool: gpu}\n", {},
     "stages.train.work_pool is set, but no Prefect server is configured: set PREFECT_API_URL"),
    ("stages:\n  train: {job_variables: {env: {A: b}}}\n", {}, "job_variables need a work_pool"),
])
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
    hide = ("import sys; sys.modules['lm_eval'] = None; from flywheel.flows.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    ws = tmp_path / "ws"
    p = subprocess.run([sys.executable, "-c", hide, "run", "--config", "c.yaml", "--workspace", str(ws)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "FLYWHEEL_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("flywheel: error:")]
    assert len(lines) == 1 and "benchmark.lm_eval needs lm-evaluation-harness: pip install -e '.[eval]'" in lines[0], \
        p.stderr
    assert "Traceback" not in p.stderr and not ws.exists()
    assert not (tmp_path / "cache").exists(), "the check comes before the policy's weights are converted"
