"""The pieces every Ray pod shares: container, security context, volumes, secrets, probes.

Security (each checked by tests/unit/test_k8s_manifests.py): non-root uid 1000 (the `ray` user
of the rayproject/ray images), no privilege escalation, every capability dropped, the runtime's
default seccomp profile, a read-only root filesystem with emptyDir volumes where Ray writes
(/tmp for /tmp/ray session files, /dev/shm for the object store, ~/.cache), no hostPath, requests =
limits on every container, and secrets only through secretKeyRef.

Probes follow what KubeRay v1.7.0 injects for Ray >= 2.53 (ray-operator/controllers/ray/common/pod.go,
initLivenessAndReadinessProbe): HTTP GET /api/healthz on the dashboard agent (52365). They are
written out so the manifest shows them; serving workers are ready only when their Serve proxy
answers /-/healthz, as KubeRay's own RayService probe requires.
"""

from __future__ import annotations

from typing import Any

from raymoe.deploy.manifests.values import APP_DIR, DeployValues, PodResources
from raymoe.deploy.manifests.yaml_text import Note

UID, GID = 1000, 100
PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "serve": 8000}
AGENT_PORT = 52365
GPU_RESOURCE = "nvidia.com/gpu"


def labels(values: DeployValues, component: str) -> dict:
    """Labels on every object and pod; `component` says which part of the platform it is."""
    return {
        "app.kubernetes.io/name": values.name,
        "app.kubernetes.io/part-of": "raymoe",
        "app.kubernetes.io/component": component,
    }


def container_security() -> Note:
    return Note(
        {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "Pod Security Standard `restricted`: non-root, no escalation, no capabilities; the root\n"
        "filesystem is read-only and Ray writes only to the emptyDir volumes mounted below.",
    )


def pod_security() -> dict:
    # fsGroup: volumes (the shared data claim included) are group-writable by the ray user's group.
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": GID,
        "fsGroup": GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(res: PodResources, why: str = "") -> Note:
    """Requests = limits (Guaranteed QoS) for one container."""
    amounts = {"cpu": res.cpu, "memory": res.memory}
    if res.gpu:
        amounts[GPU_RESOURCE] = str(res.gpu)
    return Note(
        {"requests": dict(amounts), "limits": dict(amounts)},
        why or "Requests = limits: Guaranteed QoS, never evicted for a neighbour's burst.",
    )


RAY_RESOURCES_WHY = (
    "Requests = limits: Ray sizes the node from the limits, and GPUs cannot be\n"
    "overcommitted (Kubernetes requires GPU requests to equal limits)."
)


def writable_volumes(values: DeployValues, *, data: bool = True, shm: bool = True) -> tuple[list, list]:
    """(volumes, mounts) for Ray's scratch space, its object store and the shared data claim."""
    volumes: list[dict[str, Any] | Note] = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": "/home/ray/.cache"}]
    if shm:
        volumes.append(
            Note(
                {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                "Ray's object store lives in /dev/shm; the container default (64 MiB) is too small.",
            )
        )
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if data:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": values.storage.claim_name}})
        mounts.append({"name": "data", "mountPath": values.storage.mount_path})
    return volumes, mounts


def secret_env(name: str, secret: str, key: str, *, optional: bool) -> dict:
    ref: dict[str, str | bool] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def ray_env(values: DeployValues, *, serve: bool = False) -> list:
    env = [
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        Note(
            secret_env("AWS_ACCESS_KEY_ID", values.secrets.object_store, "AWS_ACCESS_KEY_ID", optional=True),
            "Object-store credentials for s3:// paths (pyarrow reads these); optional, so a cluster\n"
            "that keeps everything on the shared volume starts without the Secret.",
        ),
        secret_env("AWS_SECRET_ACCESS_KEY", values.secrets.object_store, "AWS_SECRET_ACCESS_KEY", optional=True),
    ]
    if serve:
        env.append(
            Note(
                secret_env("RAYMOE_API_KEY", values.secrets.api_key, "api-key", optional=False),
                "The API key the Serve app checks (serve args api_key_env); replicas inherit it.",
            )
        )
    return env


def _health(port: int | str, path: str, *, timeout: int, failure: int, delay: int) -> dict:
    return {
        "httpGet": {"path": path, "port": port},
        "initialDelaySeconds": delay,
        "timeoutSeconds": timeout,
        "periodSeconds": 5,
        "successThreshold": 1,
        "failureThreshold": failure,
    }


def probes(*, head: bool, serving: bool) -> dict:
    """Liveness and readiness probes with KubeRay v1.7.0's default timings."""
    timeout = 5 if head else 2
    live = _health(AGENT_PORT, "/api/healthz", timeout=timeout, failure=120, delay=30)
    ready: dict | Note
    if serving and not head:
        ready = Note(
            _health("serve", "/-/healthz", timeout=2, failure=1, delay=10),
            "A serving worker takes traffic only while its Serve proxy is healthy; a node\n"
            "without replicas answers 503 here and leaves the Service's endpoints.",
        )
    else:
        ready = _health(AGENT_PORT, "/api/healthz", timeout=timeout, failure=10, delay=10)
    return {
        "livenessProbe": Note(live, "Raylet + dashboard agent alive (KubeRay's default for Ray >= 2.53)."),
        "readinessProbe": ready,
    }


def ray_container(values: DeployValues, name: str, res: PodResources, *, head: bool, serving: bool = False) -> dict:
    ports = ["gcs", "dashboard", "client", "metrics"] if head else ["metrics"]
    if serving:
        ports.append("serve")
    _, mounts = writable_volumes(values)
    return {
        "name": name,
        "image": values.image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": Note(
            APP_DIR,
            "The image's copy of the repository: pipeline configs and shipped data\n"
            "resolve as they do locally (the job driver inherits this directory).",
        ),
        "ports": [{"containerPort": PORTS[p], "name": p} for p in ports],
        "env": ray_env(values, serve=serving),
        "resources": resources(res, RAY_RESOURCES_WHY),
        "securityContext": container_security(),
        "volumeMounts": mounts,
        **probes(head=head, serving=serving),
    }


def pod_template(
    values: DeployValues, container: dict, *, component: str, service_account: str, token: bool, gpu: bool
) -> dict:
    volumes, _ = writable_volumes(values)
    spec = {
        "serviceAccountName": service_account,
        "automountServiceAccountToken": Note(token, "Only the head pod's autoscaler sidecar calls the Kubernetes API.")
        if token
        else False,
        "securityContext": pod_security(),
        "restartPolicy": Note(
            "Never",
            "Autoscaler v2 replaces a failed Ray pod instead of restarting it\n"
            "(KubeRay rejects other restart policies with autoscaler v2).",
        ),
        "containers": [container],
        "volumes": volumes,
    }
    if gpu:
        spec["tolerations"] = [
            Note(
                {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
                "GPU node pools are usually tainted so only GPU pods land there.",
            )
        ]
    return {"metadata": {"labels": labels(values, component)}, "spec": spec}


def one_shot_pod_template(
    values: DeployValues, container: dict, *, component: str, service_account: str, volumes: list
) -> dict:
    """A pod that runs once and needs no Kubernetes API token (a Job's, a RayJob submitter's)."""
    return {
        "metadata": {"labels": labels(values, component)},
        "spec": {
            "serviceAccountName": service_account,
            "automountServiceAccountToken": False,
            "securityContext": pod_security(),
            "restartPolicy": "Never",
            "containers": [container],
            "volumes": volumes,
        },
    }
