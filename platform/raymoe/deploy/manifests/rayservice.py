"""The RayService: the OpenAI-compatible app (`raymoe.serve.app:build_app`) on its own autoscaling
cluster, upgraded without downtime.

`serveConfigV2` is a Serve config file (docs.ray.io/en/latest/serve/production-guide/config.html);
its `args` are a `ServeConfig`, with `autoscaling` from serve_policy.py, whose plan also sets the
serving worker group's minReplicas/maxReplicas. tests/integration/test_k8s_entrypoints.py deploys
the rendered `serveConfigV2` to a local cluster. Reference: KubeRay sample
ray-service.autoscaler.yaml.
"""

from __future__ import annotations

import copy

import yaml

from raymoe.deploy.manifests import pods
from raymoe.deploy.manifests.raycluster import cluster_spec, worker_group
from raymoe.deploy.manifests.serve_policy import plan_serving
from raymoe.deploy.manifests.values import DeployValues, WorkerGroupValues
from raymoe.deploy.manifests.yaml_text import Note

APP_NAME = "raymoe"
IMPORT_PATH = "raymoe.serve.app:build_app"


def serve_args(values: DeployValues) -> dict:
    """`build_app` args: the configured app with the planned autoscaling."""
    args = copy.deepcopy(values.serve.app)
    args["autoscaling"] = plan_serving(values.serve).autoscaling
    return args


def serve_config(values: DeployValues) -> dict:
    """The Serve config (what `serve deploy` and KubeRay's serveConfigV2 take) as data."""
    return {
        # A proxy on every node; KubeRay's readiness probe keeps nodes without replicas out of
        # the Service.
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": values.serve.port},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": serve_args(values)}
        ],
    }


def serving_group(values: DeployValues) -> WorkerGroupValues:
    plan = plan_serving(values.serve)
    return WorkerGroupValues(
        name="serve", min_replicas=plan.min_nodes, max_replicas=plan.max_nodes, resources=values.serve.worker
    )


def rayservice(values: DeployValues) -> dict:
    plan = plan_serving(values.serve)
    group = worker_group(values, serving_group(values), component="serve", serving=True)
    fit = (
        f"{plan.replicas_per_node} replicas per pod"
        if plan.nodes_per_replica == 1
        else f"{plan.nodes_per_replica} pods per replica"
    )
    group["minReplicas"] = Note(plan.min_nodes, f"Serve's min_replicas at {fit}: the floor always has nodes.")
    group["maxReplicas"] = Note(plan.max_nodes, f"Serve's max_replicas at {fit}: room for the ceiling, no more.")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": values.name, "namespace": values.namespace, "labels": pods.labels(values, "serve")},
        "spec": {
            "upgradeStrategy": Note(
                {"type": "NewCluster"},
                "Zero-downtime upgrades: a changed rayClusterConfig starts a new cluster,\n"
                "traffic moves when its app is healthy, then the old one goes.\n"
                "NewClusterWithIncrementalUpgrade needs the Gateway API; None would only\n"
                "update serveConfigV2 in place.",
            ),
            "excludeHeadPodFromServeSvc": Note(
                True, "The head runs no replicas (num-cpus 0): keep it out of the Serve Service."
            ),
            "serveConfigV2": Note(
                yaml.safe_dump(serve_config(values), sort_keys=False, width=1000),
                "Serve config: one app built by raymoe.serve.app:build_app from `args`;\n"
                "args.autoscaling comes from the TTFT SLO (raymoe.deploy.manifests.serve_policy).",
            ),
            "rayClusterConfig": cluster_spec(values, [group], component="serve"),
        },
    }
