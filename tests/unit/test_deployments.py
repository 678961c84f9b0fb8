"""prefect.yaml: the scheduled deployments must not share a lineage (workspace, registered model)."""

from pathlib import Path

import yaml

from flywheel.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def lineage(deployment: dict) -> tuple[str, str]:
    """(workspace, MLflow experiment / registered model name) a deployment's runs write to."""
    params = deployment.get("parameters", {})
    if "config" in params:  # the flywheel flow: a config mapping
        config = load_config(None, params["config"])
        return str(config.workspace), config.name
    # next_round: a workspace and a config file
    config_file = params.get("config_file")
    config = load_config(ROOT / config_file if config_file else None)
    return params.get("workspace", "flywheel-data"), config.name


def test_deployments_have_separate_workspaces_and_model_names():
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    lineages = {d["name"]: lineage(d) for d in deployments}
    assert len(lineages) == len(deployments) >= 2
    workspaces = [w for w, _ in lineages.values()]
    names = [n for _, n in lineages.values()]
    assert len(set(workspaces)) == len(workspaces), f"two deployments share a workspace: {lineages}"
    assert len(set(names)) == len(names), f"two deployments share a registered model name: {lineages}"
