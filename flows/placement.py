"""Stages on Prefect work pools: a stage with `stages.<stage>.work_pool` set runs as a flow run of
the stage deployment `flywheel-stage/<pool>`, which that pool's worker starts on its own
infrastructure (a Kubernetes job with a GPU request, a Docker container, a local process).

The round and its stages exchange only ids and workspace paths: the stage run reads the run's
saved config from the (shared) workspace, rebuilds its inputs from it, writes its tables and its
manifest there, and the round reads the manifest back. Nothing else travels.

A stage run whose machine dies stays `Running` until the server's zombie automation
(configs/prefect/crash-zombie-flows.yaml, driven by flow-run heartbeats) marks it `Crashed`; the
round then retries the stage (a `stages.retries` attempt), as it retries any transient failure,
and the stage's whole-file writes make the retry leave no duplicate or missing row.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.errors import PlacementError, mask_credentials
from flywheel.storage import manifest
from flywheel.tasks.common import StageContext

STAGE_FLOW = "flywheel-stage"


class StageRunCrashed(ConnectionError):
    """The stage's flow run crashed (its worker, container or machine died): transient, retried."""


def deployment(pool: str) -> str:
    """The stage deployment that runs stages on `pool` (prefect.yaml: `flywheel-stage/<pool>`)."""
    return f"{STAGE_FLOW}/{pool}"


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def check(config) -> None:
    """Before any work: every placed stage's pool exists on the configured Prefect server and has
    its stage deployment. One line naming what is missing, and how to make it."""
    placed = config.stages.placed()
    if not placed:
        return
    url = api_url()
    first = next(iter(placed))
    if url is None:
        raise PlacementError(
            f"stages.{first}.work_pool is set, but no Prefect server is configured: set "
            "PREFECT_API_URL (stages on work pools need a server and its workers)"
        )
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    where = mask_credentials(url)
    try:
        with get_client(sync_client=True) as client:
            pools = {p.name for p in client.read_work_pools()}
            for stage, place in placed.items():
                pool = place.work_pool
                if pool not in pools:
                    raise PlacementError(
                        f"stages.{stage}.work_pool: no work pool {pool!r} on the Prefect server "
                        f"{where} (pools: {', '.join(sorted(pools)) or 'none'})"
                    )
                try:
                    dep = client.read_deployment_by_name(deployment(pool))
                except ObjectNotFound:
                    raise PlacementError(
                        f"stages.{stage}.work_pool: work pool {pool!r} has no stage deployment "
                        f"{deployment(pool)}; create it with `prefect deploy --name {pool}` "
                        "(prefect.yaml)"
                    ) from None
                if dep.work_pool_name != pool:
                    raise PlacementError(
                        f"stages.{stage}.work_pool: deployment {deployment(pool)} runs on work pool "
                        f"{dep.work_pool_name!r}, not {pool!r}"
                    )
    except PlacementError:
        raise
    except Exception as e:  # httpx, the server's errors: all mean "cannot reach it" here
        raise PlacementError(
            f"Prefect server {where} is unreachable: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}"
        ) from None


@task(name="remote-stage", cache_policy=NO_CACHE)
def remote_stage(ctx: StageContext, stage: str, fingerprint: str, params: dict) -> dict:
    """Run `stage` as a flow run of its pool's stage deployment, wait for it, and return the
    result it recorded in the workspace's manifest."""
    from prefect.deployments import run_deployment

    place = ctx.config.stages.placement(stage)
    pool = place.work_pool
    assert pool is not None  # the round sends only placed stages here
    run: Any = run_deployment(  # a FlowRun: called from sync code, it is not a coroutine
        deployment(pool),
        parameters=dict(
            workspace=str(ctx.workspace),
            run_id=ctx.run_id,
            round=ctx.round,
            stage=stage,
            fingerprint=fingerprint,
            params=params,
            mlflow_run_id=ctx.mlflow_run_id,
        ),
        job_variables=place.job_variables or None,
        timeout=None,
        poll_interval=2,
    )
    state = run.state
    what = f"round {ctx.round}: stage {stage} on work pool {pool!r} (flow run {run.name})"
    if state is not None and state.is_completed():
        done = manifest.read(ctx.workspace, ctx.run_id, ctx.round, stage)
        if done is None or done["fingerprint"] != fingerprint:
            raise PlacementError(
                f"{what} completed, but its result is not in the workspace {ctx.workspace}: "
                "the worker must see the same workspace (a shared filesystem, at the same path)"
            )
        return done["result"]
    message = (state.message or "").splitlines()[0][:500] if state is not None else ""
    if state is not None and state.is_crashed():
        raise StageRunCrashed(f"{what} crashed: {message}")
    raise PlacementError(f"{what} ended {state.name if state else 'with no state'}: {message}")
