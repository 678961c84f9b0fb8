"""Prefect flows: `flywheel` loops rounds, `one_round` chains the stages, `next_round` continues
the latest run by one round (for schedules). No ML logic here.

Every stage is idempotent: its result is recorded in a manifest, written last, keyed by a
fingerprint of its inputs and of the config's meaning (storage/manifest.py). A resumed run
reuses every completed stage and redoes the one that was interrupted; its tables are
overwritten whole (one file per table, run, round and part), so nothing is duplicated.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from prefect import flow
from prefect.tasks import exponential_backoff

from flywheel import __version__, progress
from flywheel.config import FlywheelConfig, load_config
from flywheel.errors import ConfigError, ResumeError
from flywheel.flows import placement
from flywheel.models import engines, loading, rewards
from flywheel.models.tasks.decontam import Decontaminator
from flywheel.models.tasks.splits import curriculum_levels, eval_items, make_source, transfer_suites
from flywheel.storage import catalog, datacard, lock, manifest, parquet, plots, tracking
from flywheel.tasks import promote
from flywheel.tasks import stage as stage_registry
from flywheel.tasks.common import StageContext, short_hash
from flywheel.tasks.judge import candidates_sample
from flywheel.tasks.stage import RoundState

_VERSIONED = ("torch", "transformers", "trl", "peft", "prefect", "mlflow", "duckdb", "pyarrow", "reasoning-gym")


@dataclass
class Prepared:
    """Everything checked before the first write: a bad input fails here, leaving no trace."""

    config: FlywheelConfig
    base: str
    source: object
    validation: list = field(default_factory=list)  # decides: the promotion gate, early stop
    test: list = field(default_factory=list)  # reported, never used for a decision
    transfer: list = field(default_factory=list)  # every transfer suite's items: reported
    levels: list = field(default_factory=list)  # task.curriculum's levels above 0 (splits.Level)

    def held(self) -> list:
        """Every evaluation item: no training prompt may overlap one."""
        return (
            self.validation
            + self.test
            + self.transfer
            + [it for level in self.levels for it in level.validation + level.test]
        )

    def source_at(self, level: int | None):
        """The task source a round at this curriculum level draws from (None or 0: the task's own)."""
        return self.source if not level else self.levels[level - 1].source

    def decontaminator(self) -> Decontaminator:
        """Training prompts may overlap no evaluation item."""
        cur, held = self.config.curation, self.held()
        return Decontaminator(
            [it.prompt for it in held],
            cur.decontam_ngram,
            cur.decontam_threshold,
            metadata=[it.metadata for it in held],
        )


def prepare(config: FlywheelConfig) -> Prepared:
    source = make_source(config.task)
    sources = rewards.build(config.judge, source)  # bad templates, unimportable callables fail here
    validation, test = eval_items(source, config.benchmark.validation_size, config.benchmark.size, config.seed)
    transfer = [it for _, _, items in transfer_suites(config) for it in items]  # bad options fail here
    levels = curriculum_levels(config)
    rewards.probe(sources, test[0].prompt, test[0].answer, test[0].metadata)
    engines.preflight(config)  # before the policy's weights are fetched or converted: it may take minutes
    base = loading.resolve(config.model.name)
    return Prepared(config, base, source, validation, test, transfer, levels)


PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=4)
def code_version(root: Path = PACKAGE_ROOT) -> str:
    """Exactly what ran: `0.1.0+g<sha>` from flywheel's own git checkout, `+dirty` when its tracked
    files differ from that commit; from an installed package, its version (and the commit a VCS
    install recorded). A git repository that merely contains an installed copy (a project with
    its venv inside) is not flywheel's checkout, and its HEAD is never recorded."""

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=root)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is not None and Path(top).resolve() == Path(root).resolve():
        sha = git("rev-parse", "--short=12", "HEAD")
        if sha:
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return f"{__version__}+g{sha}" + (".dirty" if dirty else "")
    return _installed_version()


def _installed_version() -> str:
    try:
        dist = metadata.distribution("flywheel")
    except metadata.PackageNotFoundError:
        return f"{__version__}+unknown"
    commit = None
    try:
        commit = json.loads(dist.read_text("direct_url.json") or "{}").get("vcs_info", {}).get("commit_id")
    except (json.JSONDecodeError, OSError):
        pass
    return f"{dist.version}+g{commit[:12]}" if commit else dist.version


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _round_row(
    ctx: StageContext,
    *,
    status: str,
    policy_in: str,
    started: datetime,
    policy_out: str | None = None,
    accuracy: float | None = None,
    n_pairs: int | None = None,
    error: str | None = None,
    template_hash: str | None = None,
    registered_version: str | None = None,
    base: str | None = None,
    promoted: bool = False,
    reasons: list[str] | None = None,
    weights_sha256: str | None = None,
    level: int | None = None,
) -> dict:
    cfg = ctx.config
    reference = None
    if ctx.round > 0:  # which model DPO measured against: this round's start ("previous") or the base
        reference = base if cfg.train.reference == "base" else policy_in
    return dict(
        run_id=ctx.run_id,
        round=ctx.round,
        status=status,
        policy_in=policy_in,
        policy_out=policy_out,
        weights_sha256=weights_sha256,
        reference_model=reference,
        config_hash=cfg.hash(),
        judge_template_hash=template_hash,
        seed=cfg.seed,
        code_version=code_version(),
        package_versions=json.dumps(package_versions()),
        mlflow_run_id=ctx.mlflow_run_id,
        registered_version=registered_version,
        promoted=promoted,
        promotion_reasons="; ".join(reasons) if reasons else None,
        accuracy=accuracy,
        n_pairs=n_pairs,
        curriculum_level=level,
        started_at=started,
        finished_at=datetime.now(UTC),
        error=error,
    )


# Only failures that may pass on their own are retried: a lost connection, a timed-out request, a
# busy or briefly failing (network) filesystem. A missing file, a denied permission or a path
# that is a directory stay what they are on every try, and a bug is never retried either.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EBUSY",
        "EINTR",
        "EIO",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EPIPE",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "ESTALE",
        "ENOLCK",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)


def is_transient(e: BaseException) -> bool:
    if type(e).__name__ == "TaskRunTimeoutError":  # a stage too slow for its timeout stays too slow
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    # HTTP clients' own network errors (requests, httpx: MLflow and Prefect servers) by class name,
    # so that neither library has to be imported to classify an error.
    if any(cls.__name__ in _TRANSIENT_HTTP for cls in type(e).__mro__):
        return True
    return isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS


_TRANSIENT_HTTP = frozenset({"ConnectionError", "Timeout", "TimeoutException", "NetworkError", "RemoteProtocolError"})


class StageTimeout(TimeoutError):
    """A stage ran past stages.timeout_s."""


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as e:  # classified, not swallowed: the state keeps the error
        return is_transient(e)
    return False


def _with_policy(task, config: FlywheelConfig):
    st = config.stages
    return task.with_options(
        retries=st.retries,
        retry_delay_seconds=exponential_backoff(st.retry_delay_s),
        retry_condition_fn=_retry_transient,
        timeout_seconds=st.timeout_s,
    )


def stage_call(stage: str, ctx: StageContext, prepared: Prepared, params: dict, fingerprint: str) -> tuple:
    """A stage's task and its arguments, rebuilt from the run's config and `params` (ids and
    paths only): the same call in the round's process and in a stage run on a work pool."""
    s = stage_registry.get(stage)
    return s.task, s.args(ctx, prepared, params, fingerprint)


@dataclass
class Stages:
    """Runs a round's stages through their manifests: a completed stage is reused, not rerun. A
    stage placed on a work pool runs there (flows/placement.py), the rest in this process."""

    ctx: StageContext
    prepared: Prepared
    force_from: str | None = None
    reused: list[str] = field(default_factory=list)

    def run_all(self, state: RoundState, stages) -> None:
        """Each stage in turn, its fingerprint chained from the one before, its result absorbed
        into the round's state for the stages after it."""
        fp = None
        for stage in stages:
            result, fp = self.run(stage.name, stage.fingerprint(fp, state), **stage.params(state))
            stage.absorb(state, result)

    def run(self, stage: str, fingerprint: str, **params) -> tuple[dict, str]:
        """(result, the fingerprint it was computed under)."""
        root, run_id, k = self.ctx.workspace, self.ctx.run_id, self.ctx.round
        done = manifest.read(root, run_id, k, stage)
        order = stage_registry.names()
        forced = self.force_from is not None and order.index(stage) >= order.index(self.force_from)
        if done is not None and not forced:
            if done["fingerprint"] != fingerprint:
                if self.force_from is None:
                    raise ResumeError(
                        f"run {run_id} round {k}: stage {stage} was computed from other inputs (the "
                        f"config changed); use --force-from-stage {stage} to redo it and what follows"
                    )
                # kept under the new config, as the user asked: recorded under its new fingerprint, so
                # the stages after it chain from the new config and a later plain resume matches
                manifest.write(root, run_id, k, stage, fingerprint, done["result"])
            self.reused.append(stage)
            return done["result"], fingerprint
        for table, part in stage_registry.get(stage).outputs:
            parquet.remove_parts(root, table, run_id, k, part)
        name = f"{stage}-round-{k}" + (" (baseline)" if k == 0 else "")
        pool = self.ctx.config.stages.placement(stage).work_pool
        if pool is not None:
            fn, args = placement.remote_stage, (stage, fingerprint, params)
        else:
            fn, args = stage_call(stage, self.ctx, self.prepared, params, fingerprint)
        progress.log(f"round {k}: {stage} started" + (f" on work pool {pool}" if pool else ""))
        t0 = time.perf_counter()
        try:
            result = _with_policy(fn, self.ctx.config).with_options(task_run_name=name)(self.ctx, *args)
        except TimeoutError as e:
            if type(e).__name__ != "TaskRunTimeoutError":
                raise
            raise StageTimeout(
                f"round {k}: stage {stage} ran past its timeout "
                f"(stages.timeout_s = {self.ctx.config.stages.timeout_s:g} s)"
            ) from None
        manifest.write(root, run_id, k, stage, fingerprint, result)
        progress.log(f"round {k}: {stage} done in {time.perf_counter() - t0:.1f} s ({_stage_summary(result)})")
        return result, fingerprint


def _stage_summary(result: dict) -> str:
    """The counts a stage's log line carries: whichever of these its result has."""
    keys = (
        "candidates",
        "generate_tokens_per_s",
        "judge_verifier_agreement",
        "pairs",
        "sft_examples",
        "train_rows",
        "train_loss",
        "accuracy",
        "mean_response_tokens",
    )
    parts = [
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
        for k in keys
        if (v := result.get(k)) is not None and not isinstance(v, (dict, list))
    ]
    return ", ".join(parts) or "no counts"


@flow(name="flywheel-round", flow_run_name="{run_id}-round-{round}")
def one_round(
    config: FlywheelConfig,
    run_id: str,
    round: int,
    champion: dict,
    base: str,
    parent_run_id: str,
    experiment_id: str,
    previous: str | None = None,
    policy_reference: str | None = None,
    force_from_stage: str | None = None,
    earlier_levels: list | None = None,
) -> dict:
    """One round: the registered stages in order (generate → judge → curate → train → benchmark →
    promote, tasks/stage.py).

    The round starts from `champion` (its policy and benchmark figures). `previous` is the policy
    the previous round started from (judges with previous: true rank this round's candidates
    with it too, for CREAM); `policy_reference` is the DPO reference the champion was trained
    against (for the implicit reward). With a curriculum, the round trains at the level the
    champion's scores call for; `earlier_levels` are the earlier rounds' (their draws stay fresh).
    """
    champ = promote.Champion(**champion)
    policy = champ.policy
    prepared = prepare(config)
    mlflow_run = tracking.find_or_start_run(
        experiment_id, f"round-{round}", parent_run_id, tags={"flywheel.run_id": run_id, "flywheel.round": str(round)}
    )
    tracking.log_params(mlflow_run, config.flat() | {"round": round, "policy_in": policy, "base_model": base})
    ctx = StageContext(config, run_id, round, mlflow_run)
    stages = Stages(ctx, prepared, force_from_stage)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    state = RoundState(config, round, policy, base, previous, policy_reference, champion=champ)
    if config.task.curriculum is not None:
        state.level = config.task.curriculum.level(champ.level_scores())
        state.earlier_levels = list(earlier_levels or [])
    try:
        stages.run_all(state, stage_registry.stages())
        metrics, policy_out = state.metrics, state.policy_out
        promoted, reasons = metrics["promoted"], metrics["promotion_reasons"]
        metrics |= {"round_seconds": time.perf_counter() - t0, "reused_stages": stages.reused}
        progress.log(f"round {round}: {'promoted to champion' if promoted else 'not promoted'}: {'; '.join(reasons)}")
        version = _log_round_artifacts(ctx, config, metrics, policy_out, metrics["trained"], promoted)
    except BaseException as e:
        error = _error_text(e)
        best_effort(
            lambda: parquet.write_table(
                config.workspace,
                "rounds",
                run_id,
                round,
                [_round_row(ctx, status="failed", policy_in=policy, started=started, error=error[:2000], base=base)],
            ),
            lambda: catalog.refresh(config.workspace),
            lambda: tracking.set_tags(mlflow_run, {"flywheel.error": error[:5000]}),
            lambda: tracking.end_run(mlflow_run, "FAILED"),
        )
        raise
    parquet.write_table(
        config.workspace,
        "rounds",
        run_id,
        round,
        [
            _round_row(
                ctx,
                status="completed",
                policy_in=policy,
                started=started,
                policy_out=policy_out,
                accuracy=metrics["accuracy"],
                n_pairs=metrics["pairs"],
                template_hash=metrics.get("judge_template_hash"),
                registered_version=version,
                base=base,
                promoted=promoted,
                reasons=reasons,
                weights_sha256=metrics["weights_sha256"],
                level=metrics.get("curriculum_level"),
            )
        ],
    )
    catalog.refresh(config.workspace)
    tracking.end_run(mlflow_run)
    progress.publish_summary(config.name, run_id, round, metrics)
    reference = base if config.train.reference == "base" else policy
    return {
        "round": round,
        "policy_in": policy,
        "policy_out": policy_out,
        "registered_version": version,
        "reference_model": reference if metrics["trained"] else policy_reference,
        **metrics,
    }


def _log_round_artifacts(
    ctx: StageContext, config: FlywheelConfig, metrics: dict, policy_out: str | None, trained: bool, promoted: bool
) -> str | None:
    run = ctx.mlflow_run_id
    assert run is not None  # a round's context carries its MLflow run
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracking.log_metrics(run, numeric | {"promoted": float(promoted)}, step=ctx.round)
    reasons = "; ".join(metrics["promotion_reasons"])
    tracking.set_tags(
        run,
        {
            "flywheel.promoted": str(promoted).lower(),
            "flywheel.promotion_reasons": reasons[:5000],
            "flywheel.weights_sha256": str(metrics.get("weights_sha256")),
        },
    )
    tracking.log_table(run, candidates_sample(ctx).to_pandas(), "samples/candidates.json")
    pairs = parquet.table_path(config.workspace, "pairs", ctx.run_id, ctx.round)
    tracking.log_artifact(run, pairs, "pairs")
    for f in (datacard.CARD, datacard.FIGURE, "judge_scores.png"):
        tracking.log_artifact(run, datacard.card_dir(config.workspace, ctx.run_id, ctx.round) / f, "data_card")
    if not trained:
        return None
    assert policy_out is not None  # a trained round wrote its checkpoint
    exact, mean = metrics.get("exact_match"), metrics.get("accuracy")
    version = tracking.log_and_register_model(
        run,
        Path(policy_out),
        config.name,
        tags={
            "flywheel.run_id": ctx.run_id,
            "flywheel.round": str(ctx.round),
            "exact_match": "unscored" if exact is None else f"{exact:.4f}",
            "mean_score": "unscored" if mean is None else f"{mean:.4f}",
            "promoted": str(promoted).lower(),
            "weights_sha256": str(metrics.get("weights_sha256")),
        },
        description=(
            f"flywheel run {ctx.run_id}, round {ctx.round}: test exact match {_pct(exact)} "
            f"(mean score {_pct(mean)}); "
            f"{'promoted to champion' if promoted else 'not promoted'} ({reasons[:1500]})"
        ),
        weights=config.registry.weights,
        weights_sha256=metrics.get("weights_sha256"),
    )
    if promoted:
        tracking.set_champion(config.name, version)
    return version


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def saved_config(workspace: Path, run_id: str) -> FlywheelConfig:
    if not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ResumeError(f"{run_id!r} is not a run id (letters, digits, '.', '_', '-'; see `flywheel runs`)")
    path = Path(workspace) / "runs" / run_id / "config.yaml"
    if not path.is_file():
        known = sorted(p.name for p in (Path(workspace) / "runs").glob("*") if p.is_dir())
        raise ResumeError(f"no run {run_id!r} in {workspace} (known: {', '.join(known[-5:]) or 'none'})")
    return load_config(path, {"workspace": str(workspace)})


# What a run's splits and round 0 rest on: --force-from-stage redoes stages of the latest round, never
# round 0 or the benchmark items, so a change here would make a run whose rounds are not comparable.
FORCE_FIXED = ("name", "seed", "model", "task", "benchmark")


def check_resumable(config: FlywheelConfig, run_id: str, force_from_stage: str | None) -> None:
    """A resumed run must mean the same as it did; which setting differs is named. With
    --force-from-stage, settings of the stages it redoes may differ, not those the run rests on."""
    saved = saved_config(config.workspace, run_id)
    if saved.hash() == config.hash():
        return
    changed = changed_settings(saved, config)
    if force_from_stage is None:
        raise ResumeError(
            f"run {run_id} was made with other settings ({', '.join(changed[:3])} differ); resume it "
            "with its own config, or use --force-from-stage STAGE"
        )
    fixed = [c for c in changed if c.split(".")[0] in FORCE_FIXED]
    if fixed:
        raise ResumeError(
            f"run {run_id}: {', '.join(fixed[:3])} changed, and its splits and earlier rounds rest "
            f"on {'it' if len(fixed) == 1 else 'them'}; --force-from-stage cannot redo that: "
            "start a new run"
        )


def changed_settings(a: FlywheelConfig, b: FlywheelConfig) -> list[str]:
    """The dotted settings whose values differ between two configs, bar where the run is and how it runs."""
    fa, fb = a.flat(), b.flat()
    return sorted(
        k[4:]
        for k in fa.keys() | fb.keys()
        if fa.get(k) != fb.get(k) and k.split(".")[1] not in ("workspace", "rounds", "stages")
    )


def round_bytes(model_bytes: int, registry_copy: bool = False) -> int:
    """Disk a round needs: its merged checkpoint (and the registered model's copy of it, with
    registry.weights: copy), the training's resumable checkpoints (up to the weights and two
    optimizer moments again, for a full fine-tune), tables and MLflow's files: 3 × the model (4 ×
    with a registry copy), and never less than MIN_FREE_BYTES."""
    return max(MIN_FREE_BYTES, MIN_FREE_BYTES // 2 + (4 if registry_copy else 3) * model_bytes)


def preflight(root: Path, model_bytes: int = 0, registry_copy: bool = False) -> None:
    """Fail before any work when the workspace cannot take a round: read-only, or too full for
    the model's size (`model_bytes`: its weight files on disk; 0 when unknown, a hub id)."""
    import shutil

    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise OSError(f"workspace {root} is not writable: {e.strerror or e}") from None
    free, need = shutil.disk_usage(root).free, round_bytes(model_bytes, registry_copy)
    if free < need:
        raise OSError(
            f"workspace {root} has only {free / 2**20:.0f} MiB free; a round needs about "
            f"{need / 2**20:.0f} MiB (checkpoints, tables, MLflow artifacts"
            + (f", for a {model_bytes / 2**30:.1f} GiB model)" if model_bytes else ")")
        )


MIN_FREE_BYTES = 2 * 2**30


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.get_parameters()
    config = params.get("config")
    name = getattr(config, "name", None) or (config.get("name") if isinstance(config, dict) else None)
    return params.get("resume") or params.get("run_id") or f"{name or 'flywheel'}-new-run"


@flow(name="flywheel", flow_run_name=_flow_run_name)
def flywheel(
    config: FlywheelConfig, resume: str | None = None, force_from_stage: str | None = None, run_id: str | None = None
) -> dict:
    """Benchmark the starting model (round 0), then run rounds up to `config.rounds`, each from
    the champion: the last round's model if it passed the promotion gate, else the best so far.
    Stops early after `promotion.stop_after` rounds in a row without a promotion.

    `resume`: a run id of this workspace to continue where it stopped (completed stages are
    reused, the interrupted one is redone, training restarts from its last checkpoint).
    `run_id`: the id of a new run (the CLI makes one so that Prefect can name the flow run by it);
    one is made here when neither is given.
    """
    prepared = check(config, resume, force_from_stage)
    with lock.workspace_lock(Path(config.workspace)):
        return _flywheel(config, prepared, resume or run_id or new_run_id(), force_from_stage)


def check(config: FlywheelConfig, resume: str | None = None, force_from_stage: str | None = None) -> Prepared:
    """Everything that can fail before work starts, in the order a user would fix it: the
    resume request, the inputs (nothing is written for bad input), the workspace's disk."""
    if force_from_stage is not None and force_from_stage not in stage_registry.names():
        raise ResumeError(f"unknown stage {force_from_stage!r} (stages: {', '.join(stage_registry.names())})")
    if force_from_stage is not None and resume is None:
        raise ResumeError("--force-from-stage redoes stages of an existing run: name it with --resume RUN")
    if resume is not None:
        check_resumable(config, resume, force_from_stage)
    for name in config.stages.placed():
        if name not in stage_registry.names() or not stage_registry.get(name).placeable:
            where = "runs in the round's own process" if name in stage_registry.names() else "is not a stage"
            raise ConfigError(
                f"stages.{name}.work_pool: {name} {where} (stages a work pool can take: "
                f"{', '.join(s.name for s in stage_registry.stages() if s.placeable)})"
            )
    placement.check(config)  # a work pool's server and deployments, before any weights are fetched
    prepared = prepare(config)
    preflight(Path(config.workspace), loading.model_bytes(prepared.base), config.registry.weights == "copy")
    return prepared


def _flywheel(config: FlywheelConfig, prepared: Prepared, run_id: str, force_from_stage: str | None) -> dict:
    root = Path(config.workspace)
    progress.name_flow_run(run_id)
    experiment_id = tracking.setup(root, config.name)
    parent = tracking.find_or_start_run(
        experiment_id, f"flywheel-{run_id}", None, tags={"flywheel.run_id": run_id, "flywheel.kind": "run"}
    )
    tracking.log_params(
        parent, config.flat() | {"run_id": run_id, "base_model": prepared.base, "code_version": code_version()}
    )
    save_config(root, run_id, config, parent)
    history = manifest.history(root, run_id)
    if force_from_stage is not None:
        _reopen_for_force(root, run_id, history, force_from_stage)
    try:
        if not history:
            history.append(_round_zero(config, prepared, run_id, parent))
        champion, references, previous, since = _replay(history, prepared.base)
        for k in range(len(history), config.rounds + 1):
            if config.promotion.stop_after is not None and since >= config.promotion.stop_after:
                from flywheel.progress import console

                console.print(f"stopping: {since} round(s) in a row without a promotion")
                break
            result = one_round(
                config,
                run_id,
                k,
                champion.__dict__,
                prepared.base,
                parent,
                experiment_id,
                previous,
                references.get(champion.policy),
                force_from_stage,
                [h.get("curriculum_level") for h in history[1:]],
            )
            manifest.write(root, run_id, k, "round", short_hash("round", config.hash(), k), result)
            history.append(result)
            tracking.log_metrics(parent, _parent_metrics(result), step=k)
            progress.log(
                f"round {k}: {'promoted' if result['promoted'] else 'not promoted'}, test exact match "
                f"{_pct(result.get('exact_match'))}; its stages are logged on flow run {run_id}-round-{k}"
            )
            champion, references, previous, since = _replay(history, prepared.base)
    except BaseException as e:
        # the cleanup is best-effort: whatever it meets, the run ends FAILED and the original error is raised
        error = _error_text(e)
        best_effort(
            lambda: tracking.set_tags(parent, {"flywheel.error": error[:5000]}),
            lambda: tracking.end_run(parent, "FAILED"),
            lambda: _publish_run(root, run_id, parent, history),
        )
        raise
    _publish_run(root, run_id, parent, history)
    _log_run_figures(parent, history, champion)
    tracking.set_tags(parent, {"flywheel.champion": champion.policy})
    tracking.end_run(parent)
    return {
        "run_id": run_id,
        "mlflow_run_id": parent,
        "experiment_id": experiment_id,
        "rounds": history,
        "champion": champion.policy,
        "champion_accuracy": champion.accuracy,
    }


def save_config(root: Path, run_id: str, config: FlywheelConfig, parent: str) -> None:
    """The run's config (what a resume reads), and every config the run has been run under, by hash:
    each round's row names the one it was made with (config_hash), so a run resumed under
    --force-from-stage keeps the config of its earlier rounds."""
    import yaml

    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    run_dir = root / "runs" / run_id
    by_hash = manifest.write_text_atomic(run_dir / "configs" / f"{config.hash()}.yaml", text)
    config_file = manifest.write_text_atomic(run_dir / "config.yaml", text)
    tracking.log_artifact(parent, config_file)
    tracking.log_artifact(parent, by_hash, "configs")
    tracking.set_tags(parent, {"flywheel.config_hash": config.hash(), "flywheel.code_version": code_version()})


def _reopen_for_force(root: Path, run_id: str, history: list[dict], stage: str) -> None:
    """--force-from-stage redoes `stage` onward in the run's latest round: the interrupted one, or
    else the last completed round (not round 0, the starting model's benchmark). The rounds before
    it stay as they were made: they are its inputs."""
    from flywheel.progress import console

    k = len(history)
    if not any(manifest.read(root, run_id, k, s) for s in stage_registry.names()):
        if k <= 1:
            return
        k -= 1
        history.pop()
        manifest.remove(root, run_id, k, "round")
    console.print(
        f"--force-from-stage {stage}: round {k} is redone from {stage} on"
        + (f"; rounds 1–{k - 1} stay as they were made" if k > 1 else "")
    )


def best_effort(*steps) -> None:
    """Run each step; one that fails is logged and the next still runs (cleanup on a failing path
    must neither hide the error being raised nor skip the steps after it)."""
    import logging

    for step in steps:
        try:
            step()
        except Exception as e:  # logged; the caller re-raises the error that matters
            logging.getLogger(__name__).warning("cleanup step failed: %s", _error_text(e).splitlines()[0])


def _publish_run(root: Path, run_id: str, parent: str, history: list[dict]) -> None:
    """The run's readable outputs: its per-round plot (and its MLflow copy) and the catalog."""
    if history:
        best_effort(
            lambda: tracking.log_artifact(parent, plots.rounds_plot(history, root / "runs" / run_id / "rounds.png"))
        )
    catalog.refresh(root)


def _log_run_figures(parent: str, history: list[dict], champion: promote.Champion) -> None:
    """End-of-run figures under keys of their own at the last round's step, so they never add a
    point to a per-round curve: the headline's change over the run and the champion's scores."""

    def gain(key: str) -> float | None:
        first, last = history[0].get(key), history[-1].get(key)
        return None if first is None or last is None else last - first

    best = next((r for r in history if r["round"] == champion.round), history[0])
    tracking.log_metrics(
        parent,
        {
            "run.exact_match_gain": gain("exact_match"),
            "run.mean_score_gain": gain("accuracy"),
            "run.champion_exact_match": best.get("exact_match"),
            "run.champion_mean_score": champion.accuracy,
        },
        step=history[-1]["round"],
    )


def _pct(v: float | None) -> str:
    return "unscored" if v is None else f"{v:.1%}"


def _round_zero(config: FlywheelConfig, prepared: Prepared, run_id: str, parent: str) -> dict:
    root = Path(config.workspace)
    ctx0 = StageContext(config, run_id, 0, parent)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    try:
        state = RoundState(config, 0, prepared.base, prepared.base)
        Stages(ctx0, prepared).run_all(state, [s for s in stage_registry.stages() if s.baseline])
        metrics = state.metrics
    except BaseException as e:
        error = _error_text(e)
        best_effort(
            lambda: parquet.write_table(
                root,
                "rounds",
                run_id,
                0,
                [_round_row(ctx0, status="failed", policy_in=prepared.base, started=started, error=error[:2000])],
            ),
            lambda: catalog.refresh(root),
        )
        raise
    metrics = dict(metrics, round_seconds=time.perf_counter() - t0)
    parquet.write_table(
        root,
        "rounds",
        run_id,
        0,
        [
            _round_row(
                ctx0,
                status="completed",
                policy_in=prepared.base,
                policy_out=prepared.base,
                started=started,
                accuracy=metrics["accuracy"],
                n_pairs=0,
                promoted=True,
                reasons=["the starting model"],
                weights_sha256=loading.weights_hash(prepared.base),
            )
        ],
    )
    result = {
        "round": 0,
        "policy_in": prepared.base,
        "policy_out": prepared.base,
        "promoted": True,
        "reference_model": None,
        **metrics,
    }
    manifest.write(root, run_id, 0, "round", short_hash("round", config.hash(), 0), result)
    tracking.log_metrics(parent, _parent_metrics(result), step=0)
    progress.publish_summary(config.name, run_id, 0, result)
    return result


def _replay(history: list[dict], base: str) -> tuple[promote.Champion, dict, str | None, int]:
    """From the completed rounds: the champion, each model's DPO reference, the policy the last
    round started from, and how many rounds in a row went without a promotion."""
    champion = promote.Champion.of(base, 0, history[0])
    references: dict[str, str | None] = {base: None}
    since = 0
    for r in history[1:]:
        references[r["policy_out"]] = r["reference_model"]
        if r["promoted"]:
            champion, since = promote.Champion.of(r["policy_out"], r["round"], r, history[0]), 0
        else:
            since += 1
    previous = history[-1]["policy_in"] if len(history) > 1 else None
    return champion, references, previous, since


@flow(name=placement.STAGE_FLOW, flow_run_name="{run_id}-round-{round}-{stage}")
def stage_run(
    workspace: str,
    run_id: str,
    round: int,
    stage: str,
    fingerprint: str,
    params: dict,
    mlflow_run_id: str | None = None,
) -> dict:
    """One stage of one round, as a flow run on a work pool's worker (the stage deployments of
    prefect.yaml): it reads the run's saved config from the shared workspace, rebuilds the stage's
    inputs from it and `params` (ids and paths), and records its result in the workspace's
    manifest, which the round reads. A stage already recorded under `fingerprint` is not redone."""
    root = Path(workspace)
    done = manifest.read(root, run_id, round, stage)
    if done is not None and done["fingerprint"] == fingerprint:
        return done["result"]
    config = saved_config(root, run_id)
    tracking.setup(root, config.name)  # the stage logs to the round's MLflow run (train's loss curve)
    ctx = StageContext(config, run_id, round, mlflow_run_id)
    fn, args = stage_call(stage, ctx, prepare(config), params, fingerprint)
    result = fn(ctx, *args)
    manifest.write(root, run_id, round, stage, fingerprint, result)
    return result


@flow(name="flywheel-next-round")
def next_round(workspace: str = "flywheel-data", config_file: str | None = None) -> dict:
    """Continue the workspace's latest run by one round (a schedule's unit of work). With no run
    yet, start one from `config_file` (or the defaults) with its round 0 and round 1."""
    root = Path(workspace)
    runs = sorted(p.parent.name for p in (root / "runs").glob("*/config.yaml")) if (root / "runs").is_dir() else []
    if not runs:
        config = load_config(Path(config_file) if config_file else None, {"workspace": workspace, "rounds": 1})
        return flywheel(config)
    run_id = runs[-1]
    done = len(manifest.history(root, run_id))
    config = saved_config(root, run_id).model_copy(update={"rounds": max(done, 1)})
    return flywheel(config, resume=run_id)


def _error_text(e: BaseException) -> str:
    """An error as it goes into the rounds table and MLflow tags: credentials in URLs masked."""
    return tracking.mask_credentials(f"{type(e).__name__}: {e}")


def _parent_metrics(m: dict) -> dict:
    # the parent run draws each as a line over rounds (step = round), stage times included
    keys = (
        "accuracy",
        "exact_match",
        "exact_match_low",
        "exact_match_high",
        "accuracy_gain",
        "accuracy_gain_low",
        "accuracy_gain_high",
        "exact_match_gain",
        "exact_match_gain_low",
        "exact_match_gain_high",
        "validation_exact_match",
        "validation_accuracy",
        "pairs_chosen_exact_share",
        "mean_response_tokens",
        "pairs",
        "mean_margin",
        "pair_length_gap",
        "judge_verifier_agreement",
        "judge_parse_failure_rate",
        "generate_seconds",
        "judge_seconds",
        "curate_seconds",
        "train_seconds",
        "benchmark_seconds",
        "round_seconds",
        "candidates",
        "curriculum_level",
    )
    # and every suite's score by name: guards, transfer suites, curriculum levels
    prefixes = ("guard_accuracy.", "transfer_exact_match.", "level_exact_match.", "level_validation_exact_match.")
    named = [k for k in m if k.startswith(prefixes)]
    return {k: m[k] for k in (*keys, *named) if isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool)}


if __name__ == "__main__":
    flywheel(FlywheelConfig())
