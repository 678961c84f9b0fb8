"""Compare iterations: per-round figures of one or more runs, as rows for a table and a plot.

The figures are read from the workspace's round manifests, which hold exactly what each round
logged to MLflow, so comparing needs neither an MLflow import nor a round trip to its server.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flywheel.errors import CompareError, mask_credentials
from flywheel.storage import manifest

COLUMNS = (
    "exact_match",
    "accuracy",
    "promoted",
    "pairs",
    "judge_verifier_agreement",
    "mean_response_tokens",
    "generate_seconds",
    "judge_seconds",
    "train_seconds",
    "benchmark_seconds",
    "round_seconds",
)


def collect(workspace: Path, run_ids: Sequence[str]) -> list[dict]:
    """One row per (run, round), in order; round 0 is the starting model's benchmark."""
    rows: list[dict] = []
    for run_id in run_ids:
        history = manifest.history(workspace, run_id)
        if not history:
            known = sorted(p.name for p in (Path(workspace) / "runs").glob("*") if p.is_dir())
            raise CompareError(
                f"no run {run_id!r} with a completed round in {workspace} (known: {', '.join(known[-5:]) or 'none'})"
            )
        for result in history:
            rows.append({"run": run_id, "round": result["round"], **{k: result.get(k) for k in COLUMNS}})
    return rows


def log_plot(workspace: Path, run_ids: Sequence[str], plot: Path) -> None:
    """Attach the comparison plot to each run's parent MLflow run (under compare/)."""
    import yaml

    from flywheel.storage import tracking

    for run_id in run_ids:
        saved = yaml.safe_load((Path(workspace) / "runs" / run_id / "config.yaml").read_text()) or {}
        experiment = tracking.setup(workspace, saved.get("name", "flywheel"))
        parent = tracking.find_run(experiment, {"flywheel.run_id": run_id, "flywheel.kind": "run"})
        if parent is None:
            raise CompareError(
                f"run {run_id!r} has no MLflow run in {mask_credentials(tracking.tracking_uri(workspace))}"
            )
        tracking.log_artifact(parent, plot, "compare")
