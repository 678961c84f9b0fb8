"""What every stage gets: the config, where it writes, and which round of which run it is."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from flywheel.config import FlywheelConfig


@dataclass(frozen=True)
class StageContext:
    config: FlywheelConfig
    run_id: str
    round: int
    mlflow_run_id: str | None = None

    @property
    def workspace(self) -> Path:
        return Path(self.config.workspace)


def short_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]
