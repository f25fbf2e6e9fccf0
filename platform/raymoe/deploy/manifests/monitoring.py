"""Monitoring on KubeRay: a PodMonitor for every Ray pod's metrics port, the alert rules as a
PrometheusRule, the Grafana dashboards as ConfigMaps for Grafana's dashboard sidecar, and a Job
that pushes them through Grafana's API instead.

The rules and dashboards are the ones `raymoe.monitor` generates from the metric registry (the same
text as dashboards/), so a renamed metric changes them here too. Reference: KubeRay
config/prometheus/podMonitor.yaml and docs "Using Prometheus and Grafana".
"""

from __future__ import annotations

import json

from raymoe.deploy.manifests import pods
from raymoe.deploy.manifests.raycluster import WORKER_SA, sa_name
from raymoe.deploy.manifests.values import DeployValues, PodResources
from raymoe.deploy.manifests.yaml_text import Note


def _metadata(values: DeployValues, name: str, component: str, *, release: bool = False) -> dict:
    base = pods.labels(values, component)
    labels: dict[str, str] | Note = base
    if release:
        labels = Note(
            dict(base, release=values.monitoring.prometheus_release),
            "kube-prometheus-stack's Prometheus selects monitors and rules by `release`.",
        )
    return {"name": name, "namespace": values.namespace, "labels": labels}


def podmonitor(values: DeployValues) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(values, f"{values.name}-ray", "monitoring", release=True),
        "spec": {
            "jobLabel": "ray.io/cluster",
            "selector": Note(
                {"matchLabels": {"ray.io/is-ray-node": "yes"}},
                "Every Ray pod KubeRay creates (head and workers of all clusters here).",
            ),
            "podTargetLabels": Note(
                ["ray.io/cluster", "ray.io/node-type"],
                "Copied onto every series as ray_io_cluster / ray_io_node_type: the\n"
                "dashboards' `cluster` variable filters on ray_io_cluster.",
            ),
            "podMetricsEndpoints": [
                {"port": "metrics", "path": "/metrics", "interval": values.monitoring.scrape_interval}
            ],
        },
    }


def prometheusrule(values: DeployValues) -> dict:
    from raymoe.monitor.alerts import build_groups

    groups = build_groups(ttft_slo_s=values.serve.scaling.ttft_slo_s)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _metadata(values, f"{values.name}-alerts", "monitoring", release=True),
        "spec": {
            "groups": Note(
                [{"name": name, "rules": [r.to_dict() for r in rules]} for name, rules in groups.items()],
                "raymoe.monitor.alerts, with the TTFT SLO of these values; runbook: docs/alerts.md.",
            )
        },
    }


def dashboard_configmaps(values: DeployValues) -> dict[str, dict]:
    """One ConfigMap per dashboard, by dashboard name."""
    from raymoe.monitor.dashboards import rendered

    out = {}
    for name, model in rendered().items():
        meta = _metadata(values, f"{values.name}-dashboard-{name}", "monitoring")
        meta["labels"] = Note(
            dict(meta["labels"], grafana_dashboard="1"),
            "Grafana's dashboard sidecar (kube-prometheus-stack) loads ConfigMaps with this label.",
        )
        meta["annotations"] = Note(
            {"grafana_folder": "raymoe"}, "The folder the sidecar files it under (its folderAnnotation setting)."
        )
        out[name] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta,
            "data": {f"{name}.json": json.dumps(model, indent=2, sort_keys=True) + "\n"},
        }
    return out


def dashboards_push_job(values: DeployValues) -> dict:
    """A one-shot Job running `raymoe dashboards push` (for a Grafana without the sidecar)."""
    container = {
        "name": "push",
        "image": values.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["raymoe", "dashboards", "push", "--url", values.monitoring.grafana_url, "--folder", "raymoe"],
        "env": [
            Note(
                pods.secret_env("GRAFANA_TOKEN", values.secrets.grafana_token, "token", optional=False),
                "A Grafana service-account token with the Editor role.",
            )
        ],
        "resources": pods.resources(PodResources(cpu="200m", memory="256Mi")),
        "securityContext": pods.container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(values, f"{values.name}-dashboards-push", "monitoring"),
        "spec": {
            "backoffLimit": 3,
            "ttlSecondsAfterFinished": Note(3600, "Deleted an hour after it ends; re-apply to push again."),
            "template": pods.one_shot_pod_template(
                values,
                container,
                component="monitoring",
                service_account=sa_name(values, WORKER_SA),
                volumes=[{"name": "tmp", "emptyDir": {}}],
            ),
        },
    }
