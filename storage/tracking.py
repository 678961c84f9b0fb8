"""MLflow tracking: one experiment per flywheel name, a parent run per `flywheel run`, a
nested run per round, and a registered model version per trained round.

The default store is a sqlite file in the workspace; `MLFLOW_TRACKING_URI` overrides it.
Runs are addressed by id through `MlflowClient`, never through a thread-local "active run",
because Prefect may execute a task on another thread than the flow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flywheel.errors import TrackingError, mask_credentials

# A key names a secret when its last word is one: `hub_token`, `api_key`, `db_password`,
# `aws_secret_access_key`. Counts of tokens (`max_new_tokens`, `max_prompt_tokens`) are not secrets.
_SECRET = re.compile(
    r"(?:^|[._-])(token|secret|password|passwd|api[_-]?key|access[_-]?key|credentials?"
    r"|private[_-]?key|auth)$",
    re.IGNORECASE,
)


# URIs this process pointed MLflow at. `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI
# (for subprocesses), so the variable alone cannot tell a user's override from our own earlier
# setup: without this, a second flywheel in the same process would log into the first one's
# store, with artifacts falling back to ./mlruns.
_SET_BY_US: set[str] = set()


def user_tracking_uri() -> str | None:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return None if not uri or uri in _SET_BY_US else uri


def tracking_uri(workspace: Path) -> str:
    return user_tracking_uri() or f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}"


def setup(workspace: Path, experiment: str) -> str:
    """Point MLflow at the store and return the experiment id (created on first use). An
    unreachable store fails here, before any work, with the URI (credentials masked)."""
    try:
        return _setup(workspace, experiment)
    except Exception as e:  # sqlalchemy, requests, … all mean the same to the user
        detail = str(e).splitlines()[0][:300] if str(e) else ""
        raise TrackingError(
            mask_credentials(
                f"MLflow tracking store {tracking_uri(workspace)} is unreachable: {type(e).__name__}: {detail}"
            )
        ) from None


def _setup(workspace: Path, experiment: str) -> str:
    import mlflow

    uri = tracking_uri(workspace)
    user_set = user_tracking_uri() is not None
    if not user_set:
        _SET_BY_US.add(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    # On the default store, artifacts live beside it in the workspace (never in ./mlruns of the cwd).
    artifacts = None if user_set else (Path(workspace).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(experiment, artifact_location=artifacts)


def redact(params: Mapping[str, Any], limit: int = 6000) -> dict[str, str]:
    """Params or tags safe to log: a secret-named key's value is masked whole, every other value has
    its credentials masked (a URL's password, an API key), then is cut to MLflow's limit (masked
    first, so that a cut never leaves half a secret unrecognised)."""
    return {k: ("***" if _SECRET.search(k) else mask_credentials(str(v)))[:limit] for k, v in params.items()}


def _masked_data(value: Any) -> Any:
    """A JSON-like value (a logged dict) with secret-named keys' values and credentials masked."""
    if isinstance(value, Mapping):
        return {k: "***" if _SECRET.search(str(k)) and value[k] else _masked_data(value[k]) for k in value}
    if isinstance(value, (list, tuple)):
        return [_masked_data(v) for v in value]
    return mask_credentials(value) if isinstance(value, str) else value


_TAG_LIMIT = 8000  # MLflow's longest tag value


def start_run(
    experiment_id: str, name: str, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> str:
    import mlflow

    all_tags = redact(tags or {}, _TAG_LIMIT)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.MlflowClient().create_run(experiment_id, run_name=mask_credentials(name), tags=all_tags)
    return run.info.run_id


def _literal(value: str) -> str | None:
    """`value` as a string in an MLflow filter. MLflow's parser strips the quotes and unescapes
    nothing, so a value holding both quote characters has no literal (None), nor, to be safe, one
    with a backslash (its tokenizer reads `\\'` as an escaped quote)."""
    if "\\" in value:
        return None
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    return None


def find_run(experiment_id: str, tags: Mapping[str, str]) -> str | None:
    """The run carrying all these tags (a resumed flywheel reuses its runs instead of adding new ones).
    Tags are compared as start_run stored them (masked). A value no filter literal can hold (a
    user's run id with quotes) is matched here instead of in MLflow's filter."""
    import mlflow

    tags = redact(tags, _TAG_LIMIT)
    literals = {k: _literal(v) for k, v in tags.items()}
    query = " AND ".join(f"tags.`{k}` = {lit}" for k, lit in literals.items() if lit is not None)
    exact = all(lit is not None for lit in literals.values())
    runs = mlflow.MlflowClient().search_runs([experiment_id], query, max_results=2 if exact else 1000)
    return next((r.info.run_id for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())), None)


def find_or_start_run(experiment_id: str, name: str, parent_run_id: str | None, tags: Mapping[str, str]) -> str:
    """Reopen the run with these tags (status RUNNING again) or start it."""
    import mlflow

    run_id = find_run(experiment_id, tags)
    if run_id is None:
        return start_run(experiment_id, name, parent_run_id, tags)
    mlflow.MlflowClient().update_run(run_id, status="RUNNING")
    return run_id


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    logged = client.get_run(run_id).data.params  # a resumed run already has them; MLflow refuses to rewrite
    items = [Param(k, v) for k, v in redact(params).items() if k not in logged]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    if items:
        mlflow.MlflowClient().log_batch(run_id, metrics=items)


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for k, v in redact(tags, _TAG_LIMIT).items():
        client.set_tag(run_id, k, v)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status=status)


@contextlib.contextmanager
def active(run_id: str) -> Iterator[None]:
    """Make `run_id` the active run of this thread, for code that logs implicitly
    (TRL/transformers' MLflow callback, `mlflow.log_table`, `log_model`)."""
    import mlflow

    current = mlflow.active_run()
    if current is not None and current.info.run_id == run_id:
        yield
        return
    mlflow.start_run(run_id=run_id, nested=current is not None)
    try:
        yield
    finally:
        # end_run() would mark the run FINISHED; keep it RUNNING until the flow says otherwise.
        mlflow.end_run(status="RUNNING")


def training_callback(run_id: str):
    """A transformers TrainerCallback that logs the trainer's numbers (loss, rewards/margins, …) to
    `run_id` by global step, and its full TrainingArguments / DPOConfig as `train/trl_config.json`.
    It replaces transformers' MLflow integration, which would log ~200 TRL fields as params and
    bury flywheel's own in MLflow's compare view, and which needs a thread-local active run."""
    from transformers import TrainerCallback

    class RoundRunLogger(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            import mlflow

            mlflow.MlflowClient().log_dict(run_id, _masked_data(args.to_dict()), "train/trl_config.json")

        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            log_metrics(run_id, numeric, step=state.global_step)

    return RoundRunLogger()


def log_table(run_id: str, data: Any, artifact_file: str) -> None:
    """A pandas DataFrame as a table artifact, its text cells' credentials masked."""
    import mlflow

    data = data.map(lambda v: mask_credentials(v) if isinstance(v, str) else v)
    mlflow.log_table(data=data, artifact_file=artifact_file, run_id=run_id)


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """A file as an artifact; a text file's credentials masked (a copy is logged, under its name)."""
    import mlflow

    with _masked_copy(Path(path)) as safe:
        mlflow.MlflowClient().log_artifact(run_id, str(safe), artifact_path)


_TEXT_LIMIT = 64 << 20  # larger files are data (tables, weights), not text a person wrote


@contextlib.contextmanager
def _masked_copy(path: Path) -> Iterator[Path]:
    """`path` itself when it is binary or holds no credential; else a masked copy of the same name."""
    text = None
    if path.stat().st_size <= _TEXT_LIMIT:
        with contextlib.suppress(UnicodeDecodeError):
            text = path.read_bytes().decode("utf-8")
    masked = None if text is None else mask_credentials(text)
    if masked is None or masked == text:
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(masked, encoding="utf-8")
        yield copy


def model_requirements() -> list[str]:
    """What a registered model needs in a fresh environment: the torch and transformers it was
    trained and tested with (pinned), nothing of flywheel (models/pyfunc.py imports none of it)."""
    from importlib import metadata

    return [f"torch=={metadata.version('torch').split('+')[0]}", f"transformers=={metadata.version('transformers')}"]


REFERENCE = "checkpoint_reference.json"  # models/pyfunc.py reads a file of this name as a pointer


def log_and_register_model(
    run_id: str,
    checkpoint: Path,
    registered_name: str,
    tags: Mapping[str, str] | None = None,
    description: str | None = None,
    weights: str = "reference",
    weights_sha256: str | None = None,
) -> str:
    """Log a transformers checkpoint as the run's model (from code: no pickle), register it, tag the
    version and describe it, the tags and description as given (credentials masked); returns the version.
    `weights="reference"`: the model's artifact is a pointer to `checkpoint` (its absolute path and
    weights hash, which loading checks); "copy": the checkpoint itself."""
    import mlflow

    client = mlflow.MlflowClient()
    # run ids are hex; the name is matched here, since MLflow's filter cannot quote every name
    done = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == registered_name]
    if done:  # a resumed round registered its model before it was interrupted
        version = str(done[0].version)
    else:
        if weights == "reference" and weights_sha256 is None:
            from flywheel.models.loading import weights_hash

            weights_sha256 = weights_hash(str(checkpoint))
        version = _register(run_id, checkpoint, registered_name, weights, weights_sha256)
    for key, value in redact(tags or {}, _TAG_LIMIT).items():
        client.set_model_version_tag(registered_name, version, key, value)
    if description:
        client.update_model_version(registered_name, version, description=mask_credentials(description))
    return version


def _register(run_id: str, checkpoint: Path, registered_name: str, weights: str, weights_sha256: str | None) -> str:
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp, active(run_id), _registry_notices_follow_logger():
        artifact = str(checkpoint)
        if weights == "reference":
            artifact = str(Path(tmp) / REFERENCE)
            Path(artifact).write_text(
                json.dumps({"checkpoint": str(Path(checkpoint).resolve()), "weights_sha256": weights_sha256}, indent=1)
            )
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).resolve().parent.parent / "models" / "pyfunc.py"),
            artifacts={"checkpoint": artifact},
            registered_model_name=registered_name,
            # Declared, not inferred: inference would import and probe the whole environment.
            pip_requirements=model_requirements(),
        )
    return str(info.registered_model_version)


@contextlib.contextmanager
def _registry_notices_follow_logger() -> Iterator[None]:
    """MLflow prints "Successfully registered model …" and "Created version …" with `eprint`, to
    its module's stream, past the `mlflow` logger that the CLI sets to ERROR without --verbose.
    Those notices are shown only where that logger shows INFO; otherwise eprint's stream is
    swapped for a sink meanwhile. (Muting the stream itself would not hold: importing parts of
    mlflow re-enables it, and it also carries the logger's own warnings.)
    tests/unit/test_tracking_registry.py fails if a new MLflow prints another way."""
    import logging

    from mlflow.utils import logging_utils

    if logging.getLogger("mlflow").isEnabledFor(logging.INFO):
        yield
        return
    stream = logging_utils.MLFLOW_LOGGING_STREAM
    logging_utils.MLFLOW_LOGGING_STREAM = _Sink()  # type: ignore[assignment]  # a stand-in with its write/flush
    try:
        yield
    finally:
        logging_utils.MLFLOW_LOGGING_STREAM = stream


class _Sink:
    enabled = False  # mlflow's enable_logging() may set it; nothing is written either way

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def set_champion(registered_name: str, version: str) -> None:
    """Point the registry alias `champion` at `version`."""
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(registered_name, "champion", version)
