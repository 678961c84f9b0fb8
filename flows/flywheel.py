"""Prefect flows: `flywheel` loops rounds, `one_round` chains the stages. No ML logic here."""

from __future__ import annotations

import json
import platform
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from prefect import flow

from flywheel import __version__
from flywheel.config import FlywheelConfig
from flywheel.models import loading, rewards
from flywheel.models.decontam import Decontaminator
from flywheel.models.tasksource import benchmark_items, make_source, train_items
from flywheel.storage import catalog, datacard, parquet, plots, tracking
from flywheel.tasks.benchmark import benchmark_task
from flywheel.tasks.common import StageContext
from flywheel.tasks.curate import curate_task
from flywheel.tasks.generate import generate_task
from flywheel.tasks.judge import candidates_sample, judge_task
from flywheel.tasks.train import train_task

_VERSIONED = ("torch", "transformers", "trl", "peft", "prefect", "mlflow", "duckdb", "pyarrow", "reasoning-gym")


@dataclass
class Prepared:
    """Everything checked before the first write: a bad input fails here, leaving no trace."""
    config: FlywheelConfig
    base: str
    source: object
    benchmark: list = field(default_factory=list)
    judge_template_hash: str | None = None

    def decontaminator(self) -> Decontaminator:
        cur = self.config.curation
        return Decontaminator([it.prompt for it in self.benchmark], cur.decontam_ngram, cur.decontam_threshold)


def prepare(config: FlywheelConfig) -> Prepared:
    source = make_source(config.task)
    sources = rewards.build(config.judge, source)  # bad templates, unimportable callables fail here
    bench = benchmark_items(source, config.benchmark.size, config.seed)
    rewards.probe(sources, bench[0].prompt, bench[0].answer, bench[0].metadata)
    template_hash = next((s.rubric.hash for s in sources if isinstance(s, rewards.LLMJudge)), None)
    base = loading.resolve(config.model.name)
    return Prepared(config, base, source, bench, template_hash)


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        if rev.returncode == 0:
            return f"{__version__}+g{rev.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _round_row(ctx: StageContext, *, status: str, policy_in: str, started: datetime, policy_out: str | None = None,
               accuracy: float | None = None, n_pairs: int | None = None, error: str | None = None,
               template_hash: str | None = None, registered_version: str | None = None,
               base: str | None = None, promoted: bool = False) -> dict:
    cfg = ctx.config
    reference = None
    if ctx.round > 0:  # which model DPO measured against: this round's start ("previous") or the base
        reference = base if cfg.train.reference == "base" else policy_in
    return dict(run_id=ctx.run_id, round=ctx.round, status=status, policy_in=policy_in, policy_out=policy_out,
                reference_model=reference,
                config_hash=cfg.hash(), judge_template_hash=template_hash, seed=cfg.seed,
                code_version=code_version(), package_versions=json.dumps(package_versions()),
                mlflow_run_id=ctx.mlflow_run_id, registered_version=registered_version,
                promoted=promoted, accuracy=accuracy, n_pairs=n_pairs,
                started_at=started, finished_at=datetime.now(timezone.utc), error=error)


@flow(name="flywheel-round")
def one_round(config: FlywheelConfig, run_id: str, round: int, policy: str, base: str, parent_run_id: str,
              experiment_id: str, champion_accuracy: float, previous: str | None = None,
              policy_reference: str | None = None) -> dict:
    """generate → judge → curate → train → benchmark for one round; returns the round's metrics.

    `previous` is the policy the previous round started from (judges with previous: true rank
    this round's candidates with it too, for CREAM); `policy_reference` is the DPO reference
    `policy` was trained against (for the implicit reward). The round's model is promoted
    (becomes the champion the next round starts from) when it was trained and its held-out
    accuracy is at least the champion's; otherwise the next round starts again from the champion.
    """
    prepared = prepare(config)
    items, removed = train_items(prepared.source, round, config.task.prompts_per_round, config.seed,
                                 prepared.decontaminator())
    mlflow_run = tracking.start_run(experiment_id, f"round-{round}", parent_run_id,
                                    tags={"flywheel.run_id": run_id, "flywheel.round": str(round)})
    tracking.log_params(mlflow_run, config.flat() | {"round": round, "policy_in": policy, "base_model": base})
    ctx = StageContext(config, run_id, round, mlflow_run)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    try:
        metrics: dict = generate_task(ctx, items, policy, [it for it, _ in removed])
        metrics |= judge_task(ctx, policy, previous if previous != policy else None, policy_reference)
        metrics |= curate_task(ctx)
        trained = train_task(ctx, policy, base)
        policy_out = trained.pop("policy_out")
        metrics |= trained
        metrics |= benchmark_task(ctx, prepared.benchmark, policy_out)
        metrics["round_seconds"] = time.perf_counter() - t0
        promoted = bool(trained["trained"]) and metrics["accuracy"] >= champion_accuracy
        metrics["promoted"] = promoted
        version = _log_round_artifacts(ctx, config, metrics, policy_out, trained["trained"], promoted)
    except BaseException as e:
        parquet.write_table(config.workspace, "rounds", run_id, round, [_round_row(
            ctx, status="failed", policy_in=policy, started=started, error=f"{type(e).__name__}: {e}"[:2000],
            base=base)])
        catalog.refresh(config.workspace)
        tracking.set_tags(mlflow_run, {"flywheel.error": f"{type(e).__name__}: {e}"[:5000]})
        tracking.end_run(mlflow_run, "FAILED")
        raise
    parquet.write_table(config.workspace, "rounds", run_id, round, [_round_row(
        ctx, status="completed", policy_in=policy, started=started, policy_out=policy_out,
        accuracy=metrics["accuracy"], n_pairs=metrics["pairs"], template_hash=metrics.get("judge_template_hash"),
        registered_version=version, base=base, promoted=promoted)])
    catalog.refresh(config.workspace)
    tracking.end_run(mlflow_run)
    reference = base if config.train.reference == "base" else policy
    return {"round": round, "policy_out": policy_out, "registered_version": version,
            "reference_model": reference if trained["trained"] else policy_reference, **metrics}


def _log_round_artifacts(ctx: StageContext, config: FlywheelConfig, metrics: dict, policy_out: str,
                         trained: bool, promoted: bool) -> str | None:
    run = ctx.mlflow_run_id
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracking.log_metrics(run, numeric | {"promoted": float(promoted)}, step=ctx.round)
    tracking.set_tags(run, {"flywheel.promoted": str(promoted).lower()})
    tracking.log_table(run, candidates_sample(ctx).to_pandas(), "samples/candidates.json")
    pairs = parquet.table_path(config.workspace, "pairs", ctx.run_id, ctx.round)
    tracking.log_artifact(run, pairs, "pairs")
    for f in (datacard.CARD, datacard.FIGURE, "judge_scores.png"):
        tracking.log_artifact(run, datacard.card_dir(config.workspace, ctx.run_id, ctx.round) / f, "data_card")
    if not trained:
        return None
    version = tracking.log_and_register_model(run, Path(policy_out), config.name)
    if promoted:
        tracking.set_champion(config.name, version)
    return version


@flow(name="flywheel")
def flywheel(config: FlywheelConfig) -> dict:
    """Benchmark the starting model (round 0), then run `config.rounds` rounds, each from the
    champion: the last round's model if it did not regress, else the best model so far."""
    prepared = prepare(config)  # fails on bad input before anything is written
    run_id = new_run_id()
    root = Path(config.workspace)
    root.mkdir(parents=True, exist_ok=True)
    experiment_id = tracking.setup(root, config.name)
    parent = tracking.start_run(experiment_id, f"flywheel-{run_id}", tags={"flywheel.run_id": run_id})
    tracking.log_params(parent, config.flat() | {"run_id": run_id, "base_model": prepared.base,
                                                 "code_version": code_version()})
    config_file = root / "runs" / run_id / "config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tracking.log_artifact(parent, config_file)
    tracking.set_tags(parent, {"flywheel.config_hash": config.hash(), "flywheel.code_version": code_version()})
    history: list[dict] = []
    try:
        ctx0 = StageContext(config, run_id, 0, parent)
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        base_metrics = benchmark_task(ctx0, prepared.benchmark, prepared.base)
        base_metrics["round_seconds"] = time.perf_counter() - t0
        parquet.write_table(root, "rounds", run_id, 0, [_round_row(
            ctx0, status="completed", policy_in=prepared.base, policy_out=prepared.base, started=started,
            accuracy=base_metrics["accuracy"], n_pairs=0, promoted=True)])
        history.append({"round": 0, "promoted": True, **base_metrics})
        tracking.log_metrics(parent, _parent_metrics(base_metrics), step=0)
        policy, champion_accuracy = prepared.base, base_metrics["accuracy"]
        references: dict[str, str | None] = {prepared.base: None}  # model → the DPO reference it was trained against
        previous = None
        for k in range(1, config.rounds + 1):
            result = one_round(config, run_id, k, policy, prepared.base, parent, experiment_id, champion_accuracy,
                               previous, references.get(policy))
            references[result["policy_out"]] = result["reference_model"]
            previous = policy
            history.append(result)
            tracking.log_metrics(parent, _parent_metrics(result), step=k)
            if result["promoted"]:  # a regressed round is not built on: the next starts from the champion
                policy, champion_accuracy = result["policy_out"], result["accuracy"]
    except BaseException:
        tracking.end_run(parent, "FAILED")
        raise
    finally:
        if history:
            plot = plots.rounds_plot(history, root / "runs" / run_id / "rounds.png")
            tracking.log_artifact(parent, plot)
        catalog.refresh(root)
    tracking.log_metrics(parent, {"accuracy_gain": history[-1]["accuracy"] - history[0]["accuracy"],
                                  "champion_accuracy": champion_accuracy})
    tracking.set_tags(parent, {"flywheel.champion": policy})
    tracking.end_run(parent)
    return {"run_id": run_id, "mlflow_run_id": parent, "experiment_id": experiment_id, "rounds": history,
            "champion": policy, "champion_accuracy": champion_accuracy}


def _parent_metrics(m: dict) -> dict:
    keys = ("accuracy", "mean_response_tokens", "pairs", "mean_margin", "pair_length_gap", "judge_verifier_agreement",
            "judge_parse_failure_rate", "round_seconds")
    return {k: m[k] for k in keys if isinstance(m.get(k), (int, float))}


if __name__ == "__main__":
    flywheel(FlywheelConfig())
