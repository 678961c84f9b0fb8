"""The errors a user can fix, in one light module: the CLI reports each as one line and exit 2
without importing the heavy modules that raise them (torch, transformers, prefect, mlflow)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a state the user can change; never a bug in flywheel."""


class ConfigError(UserError, ValueError):
    """A configuration problem."""


class TaskError(UserError, ValueError):
    """A task source that cannot give prompts (unknown task, bad options, a bad prompts file)."""


class RubricError(UserError, ValueError):
    """A judge template that cannot be used."""


class ModelNotFound(UserError, ValueError):
    """A model name that is neither embedded, a local checkpoint, nor on a reachable hub."""


class SourceError(UserError, ValueError):
    """A reward source that cannot run (an unimportable or failing callable, a bad template)."""


class ResumeError(UserError, ValueError):
    """A run that cannot be resumed as asked: unknown, or computed from other inputs."""


class WorkspaceBusy(UserError, RuntimeError):
    """Another flywheel run holds the workspace."""


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking store cannot be reached."""


class CompareError(UserError, ValueError):
    """Runs that cannot be compared."""


class ExportError(UserError, ValueError):
    """An export that cannot be written."""


class ReadOnlyError(UserError, ValueError):
    """A statement the read-only catalog refuses."""


class EngineError(UserError, RuntimeError):
    """A serving engine that cannot answer: an endpoint that stays unreachable or failing after its
    retries, a missing optional engine package. The message names the endpoint, credentials masked."""


class PlacementError(UserError, RuntimeError):
    """A stage placed on a Prefect work pool that cannot take it: no Prefect server configured, an
    unknown pool, a missing stage deployment, or a stage run that failed there."""


def mask_credentials(text: str) -> str:
    """user:password@ in any URL → ***@ (tracking URIs and endpoints may carry credentials)."""
    import re

    return re.sub(r"//[^@/\s]*@", "//***@", text)
