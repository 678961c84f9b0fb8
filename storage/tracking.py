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
_SECRET = re.compile(r"(?:^|[._-])(token|secret|password|passwd|api[_-]?key|access[_-]?key|credentials?"
                     r"|private[_-]?key|auth)$", re.I)


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
    except Exception as e:  # noqa: BLE001 - sqlalchemy, requests, … all mean the same to the user
        detail = str(e).splitlines()[0][:300] if str(e) else ""
        raise TrackingError(mask_credentials(f"MLflow tracking store {tracking_uri(workspace)} is unreachable: "
                                             f"{type(e).__name__}: {detail}")) from None


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


def redact(params: Mapping[str, Any]) -> dict[str, str]:
    """Params safe to log: values of secret-looking keys are masked, values cut to MLflow's limit."""
    return {k: ("***" if _SECRET.search(k) else str(v))[:6000] for k, v in params.items()}


def start_run(experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    import mlflow

    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.MlflowClient().create_run(experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


def find_run(experiment_id: str, tags: Mapping[str, str]) -> str | None:
    """The run carrying all these tags (a resumed flywheel reuses its runs instead of adding new ones)."""
    import mlflow

    query = " AND ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = mlflow.MlflowClient().search_runs([experiment_id], query, max_results=2)
    return runs[0].info.run_id if runs else None


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
        client.log_batch(run_id, params=items[i:i + 100])


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
    for k, v in tags.items():
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

            mlflow.MlflowClient().log_dict(run_id, args.to_dict(), "train/trl_config.json")

        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {k: v for k, v in (logs or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            log_metrics(run_id, numeric, step=state.global_step)

    return RoundRunLogger()


def log_table(run_id: str, data: Any, artifact_file: str) -> None:
    import mlflow

    mlflow.log_table(data=data, artifact_file=artifact_file, run_id=run_id)


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.MlflowClient().log_artifact(run_id, str(path), artifact_path)


def model_requirements() -> list[str]:
    """What a registered model needs in a fresh environment: the torch and transformers it was
    trained and tested with (pinned), nothing of flywheel (models/pyfunc.py imports none of it)."""
    from importlib import metadata

    return [f"torch=={metadata.version('torch').split('+')[0]}", f"transformers=={metadata.version('transformers')}"]


REFERENCE = "checkpoint_reference.json"  # models/pyfunc.py reads a file of this name as a pointer


def log_and_register_model(run_id: str, checkpoint: Path, registered_name: str,
                           tags: Mapping[str, str] | None = None, description: str | None = None,
                           weights: str = "reference", weights_sha256: str | None = None) -> str:
    """Log a transformers checkpoint as the run's model (from code: no pickle), register it, tag the
    version (run, round, accuracy, promotion, weights hash) and describe it; returns the version.
    `weights="reference"`: the model's artifact is a pointer to `checkpoint` (its absolute path and
    weights hash), not a copy of it; "copy": the checkpoint itself."""
    import tempfile

    import mlflow

    client = mlflow.MlflowClient()
    done = client.search_model_versions(f"name = '{registered_name}' and run_id = '{run_id}'")
    if done:  # a resumed round registered its model before it was interrupted
        version = str(done[0].version)
    else:
        with tempfile.TemporaryDirectory() as tmp, active(run_id):
            artifact = str(checkpoint)
            if weights == "reference":
                artifact = str(Path(tmp) / REFERENCE)
                Path(artifact).write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve()),
                                                      "weights_sha256": weights_sha256}, indent=1))
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(Path(__file__).resolve().parent.parent / "models" / "pyfunc.py"),
                artifacts={"checkpoint": artifact}, registered_model_name=registered_name,
                # Declared, not inferred: inference would import and probe the whole environment.
                pip_requirements=model_requirements(),
            )
        version = str(info.registered_model_version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_name, version, key, value)
    if description:
        client.update_model_version(registered_name, version, description=description)
    return version


def set_champion(registered_name: str, version: str) -> None:
    """Point the registry alias `champion` at `version`."""
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(registered_name, "champion", version)
