"""Readiness of an applied object, read from its status (pure: a dict in, a `Readiness` out).

The field names and values are KubeRay v1.7.0's (`ray-operator/apis/ray/v1/*_types.go`; the CRDs
in shared/k8s/crds carry the same status schema):

    RayCluster  status.state ("ready" | "failed" | "suspended", deprecated but still written) and
                status.conditions[type in RayClusterProvisioned, HeadPodReady, ReplicaFailure,
                RayClusterSuspending, RayClusterSuspended]; readyWorkerReplicas/desiredWorkerReplicas
    RayService  status.conditions[type in Ready, UpgradeInProgress, RollbackInProgress, Suspending,
                Suspended]; status.serviceStatus ("Running", deprecated, equals Ready=True)
    RayJob      status.jobDeploymentStatus ("" | Initializing | Running | Complete | Failed |
                ValidationFailed | Suspending | Suspended | Retrying | Waiting) and
                status.jobStatus (Ray's: PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED)

Every kind reports status.observedGeneration: a status older than metadata.generation describes
the previous spec, so it is never taken as ready. Kinds without a status of their own
(ConfigMap, Role, Service, ...) are ready once they exist.

A RayJob counts as ready once its job runs (jobDeploymentStatus Running or Complete): `apply
--wait` waits for a deployment, not for the end of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

READY = "ready"
PROGRESSING = "progressing"
FAILED = "failed"
SUSPENDED = "suspended"
ABSENT = "absent"

TERMINAL_NOT_READY = (FAILED, SUSPENDED)  # states that waiting longer will not turn into ready


@dataclass(frozen=True)
class Readiness:
    """One object's readiness: `state` is one of READY, PROGRESSING, FAILED, SUSPENDED, ABSENT;
    `detail` is a short line of the status fields it was read from."""

    state: str
    detail: str


def _conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in status.get("conditions") or []}


def _is_true(conds: dict[str, dict[str, Any]], ctype: str) -> bool:
    return conds.get(ctype, {}).get("status") == "True"


def _describe(conds: dict[str, dict[str, Any]], types: tuple[str, ...]) -> str:
    """`Type=Status` for each of `types` present, with the reason when the condition is not True."""
    parts = []
    for ctype in types:
        cond = conds.get(ctype)
        if cond is None:
            continue
        text = f"{ctype}={cond.get('status', 'Unknown')}"
        if cond.get("status") != "True" and cond.get("reason"):
            text += f" ({cond['reason']})"
        parts.append(text)
    return " ".join(parts)


def _message(conds: dict[str, dict[str, Any]], ctype: str) -> str:
    cond = conds.get(ctype, {})
    return ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)


def _raycluster(status: dict[str, Any]) -> Readiness:
    conds = _conditions(status)
    state = status.get("state") or ""
    workers = ""
    if "desiredWorkerReplicas" in status or "readyWorkerReplicas" in status:
        workers = f" workers={status.get('readyWorkerReplicas', 0)}/{status.get('desiredWorkerReplicas', 0)}"
    detail = " ".join(
        x
        for x in (
            f"state={state or '-'}",
            _describe(conds, ("RayClusterProvisioned", "HeadPodReady", "ReplicaFailure", "RayClusterSuspended")),
        )
        if x
    )
    detail += workers
    if _is_true(conds, "ReplicaFailure"):
        return Readiness(FAILED, f"{detail}: {_message(conds, 'ReplicaFailure')}")
    if _is_true(conds, "RayClusterSuspended") or state == "suspended":
        return Readiness(SUSPENDED, detail)
    if conds:
        ready = _is_true(conds, "RayClusterProvisioned") and _is_true(conds, "HeadPodReady")
        return Readiness(READY if ready else PROGRESSING, detail)
    # Without the RayClusterStatusConditions feature gate only the deprecated `state` is written.
    if state == "ready":
        return Readiness(READY, detail)
    if state == "failed":
        return Readiness(FAILED, f"{detail}: {status.get('reason', 'no reason given')}")
    return Readiness(PROGRESSING, detail)


def _rayservice(status: dict[str, Any]) -> Readiness:
    conds = _conditions(status)
    detail = _describe(conds, ("Ready", "UpgradeInProgress", "RollbackInProgress", "Suspended"))
    if "numServeEndpoints" in status:
        detail += f" endpoints={status['numServeEndpoints']}"
    detail = detail.strip() or f"serviceStatus={status.get('serviceStatus') or '-'}"
    if _is_true(conds, "Suspended"):
        return Readiness(SUSPENDED, detail)
    ready = conds.get("Ready")
    if ready is None:
        # Before KubeRay v1.3 only serviceStatus was written; "Running" means Ready=True.
        return Readiness(READY if status.get("serviceStatus") == "Running" else PROGRESSING, detail)
    if ready.get("status") != "True":
        if ready.get("reason") == "ValidationFailed":
            return Readiness(FAILED, f"{detail}: {_message(conds, 'Ready')}")
        return Readiness(PROGRESSING, detail)
    # Ready stays True while the old cluster serves during an upgrade; the new spec is not live yet.
    if _is_true(conds, "UpgradeInProgress") or _is_true(conds, "RollbackInProgress"):
        return Readiness(PROGRESSING, detail)
    return Readiness(READY, detail)


def _rayjob(status: dict[str, Any]) -> Readiness:
    deployment = status.get("jobDeploymentStatus") or ""
    job = status.get("jobStatus") or ""
    detail = f"jobDeploymentStatus={deployment or '-'} jobStatus={job or '-'}"
    why = ": ".join(x for x in (status.get("reason"), status.get("message")) if x)
    if deployment in ("Suspending", "Suspended"):
        # A suspended job's Ray job reads STOPPED: that is the suspension, not a failure.
        return Readiness(SUSPENDED if deployment == "Suspended" else PROGRESSING, detail)
    if deployment in ("Failed", "ValidationFailed") or job in ("FAILED", "STOPPED"):
        return Readiness(FAILED, f"{detail}: {why}" if why else detail)
    if deployment in ("Running", "Complete"):
        return Readiness(READY, detail)
    return Readiness(PROGRESSING, detail)


_BY_KIND = {"RayCluster": _raycluster, "RayService": _rayservice, "RayJob": _rayjob}


def readiness(obj: dict[str, Any] | None) -> Readiness:
    """Readiness of `obj` as the API server returned it (None: the object does not exist).

    Args:
        obj: the object (apiVersion, kind, metadata, status), or None when a GET answered 404.

    Returns:
        The state and a one-line detail naming the status fields it was read from.
    """
    if obj is None:
        return Readiness(ABSENT, "not found")
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Readiness(PROGRESSING, f"being deleted since {meta['deletionTimestamp']}")
    by_kind = _BY_KIND.get(obj.get("kind", ""))
    if by_kind is None:
        return Readiness(READY, "exists")
    status = obj.get("status") or {}
    if not status:
        return Readiness(PROGRESSING, "no status yet (is the KubeRay operator running?)")
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return Readiness(PROGRESSING, f"status is for generation {observed}, spec is generation {generation}")
    return by_kind(status)
