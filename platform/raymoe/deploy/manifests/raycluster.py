"""The RayCluster spec (KubeRay v1.7.0, `ray.io/v1`), shared by the RayCluster, every RayJob's
`rayClusterSpec` and the RayService's `rayClusterConfig`, so all of them run the same image,
security settings and autoscaler.

References: KubeRay samples ray-cluster.autoscaler-v2.yaml, ray-cluster.external-redis.yaml,
ray-cluster.pod-security.yaml (ray-project/kuberay, ray-operator/config/samples).
"""

from __future__ import annotations

from raymoe.deploy.manifests import pods
from raymoe.deploy.manifests.values import DeployValues, PodResources, WorkerGroupValues
from raymoe.deploy.manifests.yaml_text import Note

HEAD_SA = "head"
WORKER_SA = "worker"


def sa_name(values: DeployValues, role: str) -> str:
    return f"{values.name}-{role}"


def worker_group(values: DeployValues, group: WorkerGroupValues, *, component: str, serving: bool = False) -> dict:
    """One `workerGroupSpecs` entry."""
    container = pods.ray_container(values, "ray-worker", group.resources, head=False, serving=serving)
    spec = {
        "groupName": group.name,
        "replicas": Note(group.min_replicas, "Start at the minimum; the autoscaler moves it between min and max."),
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {},
    }
    if group.ray_resources:
        spec["resources"] = Note(
            {k: str(v) for k, v in sorted(group.ray_resources.items())},
            "Custom Ray resources only this group's nodes offer (a federated silo's data lives\n"
            "there); CPU, GPU and memory still come from the container limits.",
        )
    spec["template"] = pods.pod_template(
        values,
        container,
        component=component,
        service_account=sa_name(values, WORKER_SA),
        token=False,
        gpu=group.resources.gpu > 0,
    )
    return spec


def silo_groups(values: DeployValues) -> list[WorkerGroupValues]:
    """One single-node group per federated silo, offering `silo_<name>` (federated/config.py)."""
    return [
        WorkerGroupValues(
            name=f"silo-{s}",
            min_replicas=0,
            max_replicas=1,
            resources=values.silo_resources,
            ray_resources={f"silo_{s}": 1},
        )
        for s in values.silos
    ]


def head_group(values: DeployValues, *, component: str) -> dict:
    container = pods.ray_container(values, "ray-head", values.head, head=True)
    return {
        "serviceType": Note(
            "ClusterIP",
            "Dashboard/jobs (8265), GCS (6379) and client (10001) stay inside the\n"
            "cluster; the NetworkPolicies narrow them to this namespace.",
        ),
        "rayStartParams": {
            "num-cpus": Note(
                "0",
                "No tasks or actors on the head: it keeps the GCS, dashboard, autoscaler\n"
                "and job drivers responsive whatever the workers are doing.",
            ),
            "dashboard-host": Note(
                "0.0.0.0", "The job submitter pod and the operator reach the dashboard over the pod IP."
            ),
            "metrics-export-port": str(pods.PORTS["metrics"]),
        },
        "template": pods.pod_template(
            values, container, component=component, service_account=sa_name(values, HEAD_SA), token=True, gpu=False
        ),
    }


def autoscaler_options(values: DeployValues) -> dict:
    return {
        "version": Note(
            "v2",
            "Autoscaler v2 (Ray >= 2.10, KubeRay >= 1.1): scales per node type and\nremoves exactly the idle nodes.",
        ),
        "upscalingMode": Note(
            values.autoscaler.upscaling_mode,
            "Default/Aggressive: add every node the pending demand needs at once;\n"
            "Conservative: at most as many new nodes as are already running.",
        ),
        "idleTimeoutSeconds": Note(
            values.autoscaler.idle_timeout_s, "A worker idle this long is removed (down to the group's minReplicas)."
        ),
        "imagePullPolicy": "IfNotPresent",
        "resources": pods.resources(PodResources(cpu="500m", memory="512Mi")),
        "securityContext": pods.container_security(),
    }


def gcs_fault_tolerance(values: DeployValues) -> dict:
    return {
        "redisAddress": values.gcs_ft.redis_address,
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": values.secrets.redis_password, "key": "password"}}},
    }


def cluster_spec(values: DeployValues, groups: list[dict], *, component: str) -> dict:
    """A RayClusterSpec with the head, `groups` as workerGroupSpecs and the autoscaler."""
    spec = {
        "rayVersion": Note(values.ray_version, "Must match the image's Ray; KubeRay picks probes and auth by it."),
        "enableInTreeAutoscaling": Note(True, "KubeRay adds the Ray autoscaler as a sidecar of the head pod."),
        "autoscalerOptions": autoscaler_options(values),
        "authOptions": Note(
            {"mode": "token"},
            "Token auth for the dashboard, jobs API and GCS: KubeRay creates the token\n"
            "Secret and gives it to every Ray container and the job submitter.",
        ),
    }
    if values.gcs_ft.enabled:
        spec["gcsFaultToleranceOptions"] = Note(
            gcs_fault_tolerance(values),
            "GCS fault tolerance: cluster metadata in Redis, so a restarted head resumes jobs,\n"
            "actors and Serve routing instead of starting an empty cluster.",
        )
    spec["headGroupSpec"] = head_group(values, component=component)
    spec["workerGroupSpecs"] = groups
    return spec


def raycluster(values: DeployValues) -> dict:
    """The long-running RayCluster for interactive work and `ray job submit`."""
    groups = [worker_group(values, g, component="cluster") for g in values.worker_groups]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": values.name, "namespace": values.namespace, "labels": pods.labels(values, "cluster")},
        "spec": cluster_spec(values, groups, component="cluster"),
    }
