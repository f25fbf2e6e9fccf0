"""Least-privilege RBAC and NetworkPolicies.

Who calls the Kubernetes API, and for what:
- the Ray autoscaler (a sidecar of every head pod) lists and patches Ray pods and patches the
  RayCluster's replica counts: the same rules KubeRay v1.7.0 grants its own autoscaler account
  (ray-operator/controllers/ray/common/rbac.go BuildRole);
- the drift schedule's CronJob gets, deletes and creates one kind: RayJobs;
- nothing else: Ray workers, job submitters and the dashboards Job run with no API token.

Network: Ray's ports (dashboard/jobs 8265, GCS 6379, client 10001, and the raylet/object
manager/worker ports) accept connections only from pods in this namespace; the KubeRay operator
(its own namespace) may reach the head's dashboard to submit jobs and Serve configs and read their
status; Prometheus may scrape the metrics port; only the Serve port is open to other namespaces.
"""

from __future__ import annotations

from raymoe.deploy.manifests import pods
from raymoe.deploy.manifests.raycluster import HEAD_SA, WORKER_SA, sa_name
from raymoe.deploy.manifests.schedule import SCHEDULER_SA
from raymoe.deploy.manifests.values import DeployValues
from raymoe.deploy.manifests.yaml_text import Note

RAY_POD = {"ray.io/is-ray-node": "yes"}


def _meta(values: DeployValues, name: str, component: str = "security") -> dict:
    return {"name": name, "namespace": values.namespace, "labels": pods.labels(values, component)}


def service_accounts(values: DeployValues) -> dict[str, dict]:
    out = {}
    for role, why in (
        (HEAD_SA, "Head pods: the autoscaler sidecar uses this account's token."),
        (WORKER_SA, "Worker, submitter and dashboards-push pods: no API access at all."),
        (SCHEDULER_SA, "The drift CronJob: creates the drift RayJob."),
    ):
        out[role] = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(values, sa_name(values, role)),
            "automountServiceAccountToken": Note(role != WORKER_SA, why),
        }
    return out


def roles(values: DeployValues) -> dict[str, dict]:
    autoscaler = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
        Note(
            {"apiGroups": [""], "resources": ["pods/resize"], "verbs": ["patch"]},
            "In-place pod resize (KubeRay >= 1.6 autoscaler).",
        ),
        Note(
            {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get", "patch"]},
            "The autoscaler scales by patching workerGroupSpecs[].replicas / workersToDelete.",
        ),
    ]
    scheduler = [
        Note(
            {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
            "get/create/delete by the script; list/watch for `kubectl delete --wait`.",
        )
    ]
    out = {}
    for role, rules in ((HEAD_SA, autoscaler), (SCHEDULER_SA, scheduler)):
        out[role] = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(values, sa_name(values, role)),
            "rules": rules,
        }
    return out


def role_bindings(values: DeployValues) -> dict[str, dict]:
    out = {}
    for role in (HEAD_SA, SCHEDULER_SA):
        name = sa_name(values, role)
        out[role] = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(values, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": values.namespace}],
        }
    return out


def _policy(values: DeployValues, name: str, selector: dict, ingress: list, why: str) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(values, f"{values.name}-{name}"),
        "spec": {"podSelector": Note(selector, why), "policyTypes": ["Ingress"], "ingress": ingress},
    }


def _namespace(name: str) -> dict:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def network_policies(values: DeployValues) -> dict[str, dict]:
    ports = pods.PORTS
    return {
        "ray-internal": _policy(
            values,
            "ray-internal",
            {"matchLabels": RAY_POD},
            [
                Note(
                    {"from": [{"podSelector": {}}]},
                    "Any pod of this namespace, any port: Ray nodes talk on many ports (GCS, raylet, object\n"
                    "manager, worker ports); 8265, 6379 and 10001 are reachable from here only.",
                )
            ],
            "Every Ray pod: with a policy selecting it, all ingress not allowed below is denied.",
        ),
        "operator": _policy(
            values,
            "operator",
            {"matchLabels": dict(RAY_POD, **{"ray.io/node-type": "head"})},
            [
                {
                    "from": [_namespace(values.operator_namespace)],
                    "ports": [
                        {"port": ports["dashboard"], "protocol": "TCP"},
                        {"port": ports["serve"], "protocol": "TCP"},
                    ],
                }
            ],
            "Head pods: the KubeRay operator submits jobs and Serve configs to the dashboard and\n"
            "checks the head's Serve proxy.",
        ),
        "metrics": _policy(
            values,
            "metrics",
            {"matchLabels": RAY_POD},
            [
                {
                    "from": [_namespace(values.monitoring.monitoring_namespace)],
                    "ports": [{"port": ports["metrics"], "protocol": "TCP"}],
                }
            ],
            "Prometheus scrapes each Ray pod's metrics port.",
        ),
        "serve": _policy(
            values,
            "serve",
            {"matchLabels": {"app.kubernetes.io/component": "serve", **RAY_POD}},
            [{"ports": [{"port": ports["serve"], "protocol": "TCP"}]}],
            "The RayService's pods: the Serve port (OpenAI API) is the one port open beyond this namespace.",
        ),
    }
