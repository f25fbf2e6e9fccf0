"""Live expert re-placement of a running Serve app: the replica's side and the caller's side.

Replica side: the deployment's Serve handle methods `placement()` (the placement it serves with)
and `apply_placement(slot_expert)` (switch to another one) call `replica_placement` and
`apply_on_replica` here; the switch itself is `ShardedModel.apply_placement` (stage on every
shard worker, then commit between two engine steps). Requests keep flowing meanwhile.

Caller side: `apply_to_app` (the rebalance job, `python -m pipelines.rebalance`) joins the Ray
cluster and calls `apply_placement` through a `DeploymentHandle` until every running replica has
answered with the new placement (a handle call reaches one replica, chosen by Serve's router; a
replica that already serves the placement answers at once).

Why a handle method and no HTTP route: changing placement is an operator action, so it stays
inside the cluster's trust boundary (callers must be able to join the Ray cluster, as
`ray job submit` jobs and the drift job's actions do); the public HTTP surface and its API keys
stay for inference clients only.

A replica started after an apply (autoscaling, a restart) serves the app's configured placement
(`redundant_experts`) until the next apply; the drift job or a schedule re-applies.
"""

from __future__ import annotations

import logging
import time

from raymoe.config import ConfigError
from raymoe.parallel.layout import ExpertPlacement

log = logging.getLogger(__name__)


def expert_copies_of(slot_expert: list[int], num_experts: int) -> list[int]:
    """Physical copies of each logical expert in a slot list."""
    copies = [0] * num_experts
    for expert in slot_expert:
        copies[expert] += 1
    return copies


def _sharded(engine):
    """The engine's `ShardedModel`, or None when the model runs in the replica (ep=1)."""
    model = getattr(getattr(engine, "core", None), "model", None)
    return model if hasattr(model, "apply_placement") else None


def replica_placement(engine, num_experts: int) -> dict:
    """What the replica serves with: `ep`, `slot_expert`, `expert_copies`, `version` (0 = the
    configured placement, +1 per apply)."""
    model = _sharded(engine)
    if model is None:
        slots = list(range(num_experts))
        return {
            "ep": 1,
            "num_experts": num_experts,
            "slot_expert": slots,
            "expert_copies": [1] * num_experts,
            "version": 0,
        }
    p = model.placement
    return {
        "ep": p.ep,
        "num_experts": p.num_experts,
        "slot_expert": list(p.slot_expert),
        "expert_copies": expert_copies_of(p.slot_expert, p.num_experts),
        "version": model.placement_version,
    }


def apply_on_replica(engine, slot_expert: list[int], timeout_s: float = 300.0) -> dict:
    """Switches this replica's shard workers to `slot_expert` (blocking; run it off the event loop).

    Returns:
        The new `replica_placement`, plus `changed` (False when it already served that placement),
        `loaded` (expert-layers read from the artifact) and `seconds`.

    Raises:
        ConfigError: ep=1 (nothing to place), or a slot list that does not fit the model.
    """
    model = _sharded(engine)
    if model is None:
        raise ConfigError("live re-placement needs an expert-parallel app (ep > 1); this replica runs ep=1")
    current = model.placement
    placement = ExpertPlacement(num_experts=current.num_experts, ep=current.ep, slot_expert=list(slot_expert))
    if placement.slot_expert == current.slot_expert:
        return {**replica_placement(engine, current.num_experts), "changed": False, "loaded": 0, "seconds": 0.0}
    result = model.apply_placement(placement, timeout_s=timeout_s)
    log.info(
        "re-placement %d applied: %d expert-layers loaded, %.3f s",
        result["version"],
        result["loaded"],
        result["seconds"],
    )
    return {
        **replica_placement(engine, current.num_experts),
        "changed": True,
        "loaded": result["loaded"],
        "seconds": result["seconds"],
    }


def connect_ray() -> None:
    """Joins RAY_ADDRESS, else the cluster `ray start` runs on this machine (a new embedded
    cluster could not hold the app); nothing when Ray is up (a job submitted to the cluster)."""
    import os

    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)


def _running_replicas(app_name: str, deployment: str) -> int:
    from ray import serve

    status = serve.status()
    if app_name not in status.applications:
        raise ConfigError(f"apply.app_name: no Serve application {app_name!r} (running: {sorted(status.applications)})")
    deployments = status.applications[app_name].deployments
    if deployment not in deployments:
        raise ConfigError(
            f"apply.deployment: application {app_name!r} has no deployment {deployment!r} "
            f"(it has {sorted(deployments)})"
        )
    # Keyed by Serve's ReplicaState, a str enum: compared with its name, not imported from _private.
    return sum(n for state, n in deployments[deployment].replica_states.items() if state == "RUNNING")


def app_placement(app_name: str, deployment: str, timeout_s: float = 60.0) -> dict:
    """The placement one replica of the app serves with (`replica_placement` plus `replica`)."""
    from ray import serve

    _running_replicas(app_name, deployment)
    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    return handle.placement.remote().result(timeout_s=timeout_s)


def apply_to_app(
    slot_expert: list[int], *, app_name: str, deployment: str, timeout_s: float = 300.0, max_calls: int = 0
) -> list[dict]:
    """Applies `slot_expert` to every running replica of a Serve app (Ray must be connected).

    Args:
        slot_expert: the logical expert of each physical slot (worker w owns slots w*S..(w+1)*S-1).
        app_name: the Serve application's name.
        deployment: the deployment's name (`ServeConfig.name`, default OpenAIServer).
        timeout_s: how long one replica may take to switch.
        max_calls: handle calls before giving up on reaching every replica; 0 = 8 x replicas.

    Returns:
        One answer per replica (`replica`, `changed`, `loaded`, `seconds`, the new placement).

    Raises:
        RuntimeError: not every running replica answered within `max_calls` calls.
    """
    from ray import serve

    expected = _running_replicas(app_name, deployment)
    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    answers: dict[str, dict] = {}
    start = time.perf_counter()
    for _ in range(max_calls or 8 * max(1, expected)):
        answer = handle.apply_placement.remote(list(slot_expert)).result(timeout_s=timeout_s)
        answers[answer["replica"]] = answer
        if len(answers) >= expected:
            break
    if len(answers) < expected:
        raise RuntimeError(
            f"{app_name}/{deployment}: {len(answers)} of {expected} replicas answered; "
            f"rerun to reach the others (a replica that has the placement answers at once)"
        )
    log.info(
        "placement applied to %d replica(s) of %s/%s in %.2f s",
        len(answers),
        app_name,
        deployment,
        time.perf_counter() - start,
    )
    return list(answers.values())
