"""Fine-tuning with TRL, LoRA via peft, merged into a full checkpoint.

- DPO (`DPOConfig` + `DPOTrainer`) on preference pairs. With LoRA and no explicit reference
  model, TRL uses the policy with its adapter disabled as the reference: that is the round's
  starting policy ("previous", iterative DPO). With reference="base", the base model is loaded
  and passed as `ref_model`.
- SFT (`SFTConfig` + `SFTTrainer`) on each prompt's best sample (STaR / ReST), prompt-completion
  format, loss on the completion only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flywheel import compat
from flywheel.config import TrainConfig
from flywheel.models import loading
from flywheel.models.training import args
from flywheel.storage import export


def dataset(method: str, rows: Sequence[dict]):
    """TRL's conversational formats: preference (DPO) or prompt-completion (SFT)."""
    from datasets import Dataset

    return Dataset.from_list(export.conversational("sft" if method == "sft" else "pairs", rows))


def _progress_callback():
    """Training progress as a flywheel stage line (steps done, steps/s) instead of raw log dicts."""
    import contextlib

    from transformers import TrainerCallback

    from flywheel import progress

    class StageProgress(TrainerCallback):
        def __init__(self) -> None:
            self.stack = contextlib.ExitStack()
            self.advance = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.advance = self.stack.enter_context(
                progress.stage("train", state.max_steps, "steps", done=state.global_step)
            )

        def on_step_end(self, args, state, control, **kwargs):
            if self.advance:
                self.advance(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.stack.close()

    return StageProgress()


def score_labelled_positions_only() -> bool:
    """On the CPU, TRL's fused LM head projects only the positions that carry a label.

    TRL (1.x) turns DPO's and SFT's hidden states into per-token log-probs through a fused LM head
    (`trl.trainer.utils.add_fused_lm_head`). On devices with Triton it projects only the positions
    whose label is not -100 (the completion's tokens); elsewhere it projects every position,
    prompt and padding included, so that a compiler that specialises on shapes (Neuron's) sees one
    tile shape. Run eagerly, the CPU compiles nothing per shape, and there the vocabulary
    projection (49,152 outputs per position, forward and backward) of the prompt and padding
    positions dominated DPO's time (benchmarks/round.py --only train measures it alone). This
    makes the CPU take the labelled-positions path when not under torch.compile: the same
    log-probs, computed on fewer rows. TRL's kernels keep their own choice (no Triton on the CPU).
    True when it applies (a TRL with that switch: flywheel/compat.py)."""
    return compat.trl_fused_head_on_cpu()


def work_key(fingerprint: str, policy: str, seed: int, rows: Sequence[dict]) -> str:
    """What a training's checkpoints are valid for: the stage's fingerprint, or (called directly,
    without one) its policy, seed and row count."""
    return fingerprint or f"{policy}:{seed}:{len(rows)}"


def work_dir(out: Path, fingerprint: str) -> Path:
    """Where a training keeps its checkpoints until it has finished: kept across a crash so a
    rerun resumes from the last one, unless that was written for other inputs."""
    work = out.parent / f".{out.name}.work"
    stamp = work / "fingerprint"
    if work.exists() and (not stamp.is_file() or stamp.read_text() != fingerprint):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    return work


def reference_in_memory(trainer) -> str:
    """How DPO's reference was held while training: `precomputed` (its log-probs computed once,
    before training, then no reference model), `disabled_adapter` (PEFT: the policy with its LoRA
    adapter switched off), `second_model` (a full copy beside the policy); `none` for SFT."""
    if not hasattr(trainer, "ref_model"):
        return "none"
    if trainer.args.precompute_ref_log_probs:
        return "precomputed"
    return "second_model" if trainer.ref_model is not None else "disabled_adapter"


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that was written to the end. Transformers writes trainer_state.json
    last, so a checkpoint without it is one a killed process was still saving (its weights or
    optimizer state may be cut short): resuming from it would fail or, worse, load garbage."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if p.name[11:].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name[11:]))) if done else None


def train(
    policy: str,
    rows: Sequence[dict],
    cfg: TrainConfig,
    out: Path,
    *,
    base: str,
    seed: int,
    callbacks: Sequence[Any] = (),
    dtype: str = "auto",
    fingerprint: str = "",
    checkpoint_steps: int = 5,
    prepared: bool = False,
    data=None,
) -> dict[str, float]:
    """Train from `policy` on `rows` (pairs for DPO, prompt/completion for SFT, by `cfg.method`),
    write a merged checkpoint to `out`, return final train metrics. A training killed midway
    resumes from its last checkpoint when called again with the same fingerprint. `callbacks`:
    transformers TrainerCallbacks (the round's MLflow logging); no integration reports on its own."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer, SFTTrainer

    torch_dtype = loading.default_dtype() if dtype == "auto" else getattr(torch, dtype)
    score_labelled_positions_only()
    tok = AutoTokenizer.from_pretrained(policy)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch_dtype)
    peft_config = None
    if cfg.lora:
        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    rank = int(os.environ.get("RANK", "0"))  # set by `accelerate launch` in each process of a training job
    # A launched job's work directory was prepared by the stage before launch (one process, no race).
    work = out.parent / f".{out.name}.work" if prepared else work_dir(out, work_key(fingerprint, policy, seed, rows))
    resume = last_complete_checkpoint(work / "trainer")
    if resume and rank == 0:
        from flywheel import progress

        progress.say(f"[train] resuming from {Path(resume).name}")
    shown = [_progress_callback()] if rank == 0 else []  # one progress line per job, not per process
    common = {
        "model": model,
        "args": args.build(
            cfg.method,
            cfg.sft if cfg.method == "sft" else cfg.dpo,
            output_dir=work / "trainer",
            seed=seed,
            checkpoint_steps=checkpoint_steps,
        ),
        "processing_class": tok,
        "peft_config": peft_config,
        "callbacks": [*shown, *callbacks],
    }
    if data is None:
        data = dataset(cfg.method, rows)
    trainer: SFTTrainer | DPOTrainer
    if cfg.method == "sft":
        trainer = SFTTrainer(train_dataset=data, **common)
    else:
        ref_model = None
        if cfg.reference == "base" and (base != policy or not cfg.lora):
            ref_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
        trainer = dpo = DPOTrainer(ref_model=ref_model, train_dataset=data, **common)
        precomputed = dpo.args.precompute_ref_log_probs  # type: ignore[attr-defined]  # args: its DPOConfig
        if precomputed and dpo.ref_model is not None and not dpo.is_fsdp_enabled:
            # The reference's log-probs are columns of the dataset now (TRL computed them in its
            # constructor) and TRL keeps a reference model it was given: free it, so training holds
            # one model, not two (TRL frees its own only under FSDP).
            import gc

            dpo.ref_model = ref_model = None
            gc.collect()
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # raw log dicts; the metrics go to MLflow instead
    # torch's own attention backend here: without cuDNN's, an H200's DPO steps were 5% faster with LoRA
    # and 12% slower in a full fine-tune (benchmarks/gpu_smoke.py), so decoding alone avoids it
    result = trainer.train(resume_from_checkpoint=resume)
    history = [h for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "train_world_size": trainer.args.world_size,
        "train_reference": reference_in_memory(trainer),
    }
    if prepared:
        # A launched job's weights may be sharded (FSDP, ZeRO-3): every process takes part in
        # save_model, which gathers them; then the main process merges the adapter into the policy.
        shutil.rmtree(work / "saved", ignore_errors=True)
        trainer.save_model(str(work / "saved"))
        trainer.accelerator.wait_for_everyone()
        if not trainer.accelerator.is_main_process:
            return metrics
        shutil.rmtree(work / "model", ignore_errors=True)
        if cfg.lora:
            from peft import PeftModel

            merged = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(policy, dtype=torch_dtype), str(work / "saved")
            ).merge_and_unload()
            merged.save_pretrained(work / "model")
        else:
            os.replace(work / "saved", work / "model")
    else:
        trained: Any = trainer.model  # a PeftModel with LoRA, a PreTrainedModel otherwise
        merged = trained.merge_and_unload() if cfg.lora else trained
        shutil.rmtree(work / "model", ignore_errors=True)
        merged.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    if out.exists():  # a re-run of the stage replaces its own earlier output
        shutil.rmtree(out)
    os.replace(work / "model", out)  # the checkpoint appears whole or not at all
    shutil.rmtree(work, ignore_errors=True)
    last = history[-1] if history else {}
    for key in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        if key in last:
            metrics["dpo_" + key.replace("/", "_")] = last[key]
    return metrics


def launch(
    policy: str,
    rows: Sequence[dict],
    cfg: TrainConfig,
    out: Path,
    *,
    base: str,
    seed: int,
    dtype: str,
    fingerprint: str,
    checkpoint_steps: int,
    mlflow_run_id: str | None,
    tracking_uri: str | None,
) -> dict:
    """Train as its own job: `accelerate launch -m flywheel.models.training.job` with the user's
    Accelerate config (DDP, FSDP, DeepSpeed) and/or `cfg.num_processes` processes. The stage's
    process holds no model meanwhile; the job reads the dataset from disk, every process trains,
    the main process writes the merged checkpoint to `out` and the metrics to result.json. Its
    output is passed through (progress) and kept in the job directory's train.log; a failure ends
    in one line that names it."""
    import json
    import socket
    import subprocess
    import sys
    from collections import deque

    work_dir(out, work_key(fingerprint, policy, seed, rows))  # prepared here, once, for every process
    job_dir = out.parent / f".{out.name}.job"  # beside the work dir, which the training removes when done
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    # On disk, once: every process maps the same file-backed dataset, so the caches TRL shares
    # between processes (tokenized rows, precomputed reference log-probs) live beside it.
    dataset(cfg.method, rows).save_to_disk(str(job_dir / "dataset"))
    job = {
        "policy": policy,
        "cfg": cfg.model_dump(mode="json"),
        "out": str(out),
        "base": base,
        "seed": seed,
        "dtype": dtype,
        "fingerprint": fingerprint,
        "checkpoint_steps": checkpoint_steps,
        "mlflow_run_id": mlflow_run_id,
    }
    (job_dir / "job.json").write_text(json.dumps(job))
    with socket.socket() as sock:  # a free rendezvous port: two jobs on one machine must not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ)
    if cfg.accelerate_config is not None:
        cmd += ["--config_file", str(cfg.accelerate_config)]
        if cfg.num_processes > 1:
            cmd += ["--num_processes", str(cfg.num_processes)]
    else:
        cmd += [
            "--num_processes",
            str(cfg.num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        if cfg.num_processes > 1:
            cmd += ["--multi_gpu"]  # DDP; without a GPU, Accelerate runs it on the CPU over gloo
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"
    cmd += ["--main_process_port", str(port), "-m", "flywheel.models.training.job", str(job_dir / "job.json")]
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    tail: deque[str] = deque(maxlen=40)
    with open(job_dir / "train.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip())
            if line.startswith("[train]"):  # the job's progress lines, as an in-process training shows them
                sys.stderr.write(line)
        rc = proc.wait()
    result = job_dir / "result.json"
    if rc != 0 or not result.is_file():
        cause = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
        raise TrainJobError(
            f"training job failed (exit {rc}): {cause.strip()[:300]} (full output: {job_dir / 'train.log'})"
        )
    out_metrics = json.loads(result.read_text())
    out_metrics["train_ranks_stepped"] = sorted(
        json.loads(f.read_text())["global_step"] for f in job_dir.glob("rank-*.json")
    )
    return out_metrics


class TrainJobError(RuntimeError):
    """A launched training job that exited without a checkpoint."""
