"""Stage manifests: what makes a stage idempotent and a run resumable.

A stage writes its tables first and its manifest last, so the manifest's existence means the
stage completed. The manifest holds the stage's fingerprint (a hash of its inputs and of the
config's meaning) and its result, so a resumed run reuses a completed stage without running
it, and recognises one that was computed from other inputs.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def path(root: Path, run_id: str, round_: int, stage: str) -> Path:
    return Path(root) / "runs" / run_id / f"round={round_}" / f"{stage}.done.json"


def read(root: Path, run_id: str, round_: int, stage: str) -> dict[str, Any] | None:
    p = path(root, run_id, round_, stage)
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def write_text_atomic(p: Path, text: str) -> Path:
    """Write a whole file or nothing: a temporary name in the same folder, fsynced, then renamed, so
    a crash or a reader never sees half of it."""
    p = Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def write(root: Path, run_id: str, round_: int, stage: str, fingerprint: str, result: dict[str, Any]) -> Path:
    return write_text_atomic(
        path(root, run_id, round_, stage),
        json.dumps(
            {
                "stage": stage,
                "fingerprint": fingerprint,
                "result": result,
                "finished_at": datetime.now(UTC).isoformat(),
            },
            default=str,
            indent=1,
        ),
    )


def remove(root: Path, run_id: str, round_: int, stage: str) -> None:
    path(root, run_id, round_, stage).unlink(missing_ok=True)


def history(root: Path, run_id: str) -> list[dict[str, Any]]:
    """The results of a run's completed rounds, in order (round 0: the base model's benchmark)."""
    out = []
    for k in range(0, 10_000):
        done = read(root, run_id, k, "round")
        if done is None:
            break
        out.append(done["result"])
    return out
