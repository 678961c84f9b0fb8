"""Compare iterations: per-round figures of one or more runs, read back from MLflow (the round
runs' metrics, the parent run's round-0 benchmark), as rows for a table and a plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flywheel.storage import tracking

COLUMNS = ("accuracy", "promoted", "pairs", "judge_verifier_agreement", "mean_response_tokens", "generate_seconds",
           "judge_seconds", "train_seconds", "benchmark_seconds", "round_seconds")


class CompareError(ValueError):
    pass


def collect(workspace: Path, experiment: str, run_ids: Sequence[str]) -> list[dict]:
    """One row per (run, round), in order; round 0 is the starting model's benchmark."""
    import mlflow

    tracking.setup(workspace, experiment)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    rows: list[dict] = []
    for run_id in run_ids:
        parent = tracking.find_run(exp.experiment_id, {"flywheel.run_id": run_id, "flywheel.kind": "run"})
        if parent is None:
            raise CompareError(f"no run {run_id!r} in MLflow experiment {experiment!r} ({tracking.tracking_uri(workspace)})")
        zero = {m.key: m.value for key in ("accuracy", "mean_response_tokens", "round_seconds")
                for m in client.get_metric_history(parent, key) if m.step == 0}
        rows.append({"run": run_id, "round": 0, "status": client.get_run(parent).info.status, **zero,
                     "promoted": 1.0})
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
        for child in sorted(children, key=lambda r: int(r.data.tags.get("flywheel.round", 0))):
            m = child.data.metrics
            rows.append({"run": run_id, "round": int(child.data.tags["flywheel.round"]), "status": child.info.status,
                         **{k: m.get(k) for k in COLUMNS}})
    return rows
