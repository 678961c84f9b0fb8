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


# The userinfo of a URL (`scheme://user:password@host`), up to the authority's last '@': a password
# may hold ':' or an unescaped '@'. Any scheme (postgresql+psycopg://, https://, s3://).
_USERINFO = r"(?<=//)[^\s/\"'<>`]*@"
# query-string and connection-string settings that hold a secret (`?api_key=…`, `password=…`)
_SECRET_SETTING = (
    r"(?i)(?<![\w-])((?:api[_-]?key|access[_-]?token|auth[_-]?token|token|secret|password|passwd|pwd)"
    r"\s*[=:]\s*)[^\s&;,'\"]+"
)
_BEARER = r"(?i)\b(bearer\s+)[\w.~+/=-]{16,}"
# The shapes of common API keys: OpenAI/Anthropic (sk-…), Hugging Face, GitHub, GitLab, AWS, Slack.
_KEY_SHAPES = (
    r"\b(?:sk-[\w-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|glpat-[\w-]{20,}"
    r"|AKIA[0-9A-Z]{16}|xox[abprs]-[\w-]{10,})"
)
# Environment variables whose names say they hold a secret (OPENAI_API_KEY, HF_TOKEN, an engine's
# openai.api_key_env): their values are masked wherever they appear, whatever their shape. Short
# values are left alone: masking "true" or a port number would garble every text it occurs in.
_SECRET_ENV = r"(?i)(?:^|_)(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$"
_MIN_SECRET_LEN = 12


def mask_credentials(text: str) -> str:
    """Credentials in any text → ***: URL userinfo, secret settings (password=…, ?api_key=…),
    bearer tokens, API-key shapes, and the values of secret-named environment variables.
    Tracking URIs, endpoints and errors carry them; nothing flywheel persists or prints may."""
    import os
    import re

    for value in sorted(
        (v for k, v in os.environ.items() if re.search(_SECRET_ENV, k) and len(v) >= _MIN_SECRET_LEN),
        key=len,
        reverse=True,
    ):
        text = text.replace(value, "***")
    text = re.sub(_USERINFO, "***@", text)
    text = re.sub(_SECRET_SETTING, r"\1***", text)
    text = re.sub(_BEARER, r"\1***", text)
    return re.sub(_KEY_SHAPES, "***", text)
