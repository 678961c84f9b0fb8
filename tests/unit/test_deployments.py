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


STAGE_ENTRYPOINT = "flywheel.flows.flywheel:stage_run"


def test_deployments_have_separate_workspaces_and_model_names():
    # stage deployments have no lineage of their own: they run a stage of whichever round asks
    deployments = [
        d
        for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        if d["entrypoint"] != STAGE_ENTRYPOINT
    ]
    lineages = {d["name"]: lineage(d) for d in deployments}
    assert len(lineages) == len(deployments) >= 2
    workspaces = [w for w, _ in lineages.values()]
    names = [n for _, n in lineages.values()]
    assert len(set(workspaces)) == len(workspaces), f"two deployments share a workspace: {lineages}"
    assert len(set(names)) == len(names), f"two deployments share a registered model name: {lineages}"


def test_stage_deployments_are_named_after_their_pool_and_run_the_stage_flow():
    """A round finds a pool's stage deployment as flywheel-stage/<pool> (flows/placement.py)."""
    import importlib

    from flywheel.flows import placement

    stages = [
        d
        for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        if d["entrypoint"] == STAGE_ENTRYPOINT
    ]
    assert stages, "prefect.yaml has no stage deployment"
    module, attr = STAGE_ENTRYPOINT.split(":")
    flow = getattr(importlib.import_module(module), attr)
    for d in stages:
        assert placement.deployment(d["work_pool"]["name"]) == f"{flow.name}/{d['name']}"
