"""`render_manifests(values)`: every file under k8s/, as text, from one `DeployValues`.

Layout (paths relative to k8s/):
    base/<kind>.<name>.yaml          one resource per file + kustomization.yaml (the platform)
    base/jobs/rayjob.<pipeline>.yaml the pipelines as RayJobs, created one at a time
    overlays/<preset>/               kustomization.yaml + JSON patches against base/,
                                     jobs/rayjob.<pipeline>.yaml rendered with the preset's values

Rendering is deterministic: the same values give byte-identical files.
"""

from __future__ import annotations

import os
from pathlib import Path

from raymoe.config import ConfigError, from_dict, to_dict
from raymoe.deploy.manifests import monitoring, security
from raymoe.deploy.manifests.kustomize import base_kustomization, overlay_files
from raymoe.deploy.manifests.namespace import data_claim, namespace
from raymoe.deploy.manifests.presets import PRESETS
from raymoe.deploy.manifests.raycluster import raycluster
from raymoe.deploy.manifests.rayjob import rayjob
from raymoe.deploy.manifests.rayservice import rayservice
from raymoe.deploy.manifests.schedule import drift_configmap, drift_cronjob
from raymoe.deploy.manifests.values import PIPELINES, DeployValues
from raymoe.deploy.manifests.yaml_text import emit, plain

FOOTER = (
    "Rendered by `raymoe manifests render` (raymoe.deploy.manifests) from DeployValues; do not edit:\n"
    "change the values and render again (tests/unit/test_k8s_manifests.py checks it is current)."
)


def platform_resources(values: DeployValues) -> dict[str, tuple[dict, str]]:
    """(tree, one-line description) by file name, in the order kustomize lists them."""
    out: dict[str, tuple[dict, str]] = {
        "namespace.yaml": (namespace(values), "the namespace, Pod Security `restricted` enforced"),
    }
    for role, tree in security.service_accounts(values).items():
        out[f"serviceaccount.{role}.yaml"] = (tree, f"the {role} pods' identity")
    for role, tree in security.roles(values).items():
        out[f"role.{role}.yaml"] = (tree, f"what the {role} account may call")
    for role, tree in security.role_bindings(values).items():
        out[f"rolebinding.{role}.yaml"] = (tree, f"grants role.{role} to its account")
    for name, tree in security.network_policies(values).items():
        out[f"networkpolicy.{name}.yaml"] = (tree, "who may connect to which Ray pod ports")
    out["persistentvolumeclaim.data.yaml"] = (data_claim(values), "the shared data volume")
    out["raycluster.raymoe.yaml"] = (
        raycluster(values),
        "long-running cluster for interactive work and `ray job submit`",
    )
    out["rayservice.serve.yaml"] = (rayservice(values), "the OpenAI-compatible API on Ray Serve, autoscaled")
    out["configmap.drift-rayjob.yaml"] = (drift_configmap(values), "the drift RayJob the CronJob creates")
    out["cronjob.drift.yaml"] = (drift_cronjob(values), "runs the drift check on a schedule")
    out["podmonitor.ray.yaml"] = (monitoring.podmonitor(values), "Prometheus scrapes every Ray pod")
    out["prometheusrule.alerts.yaml"] = (monitoring.prometheusrule(values), "raymoe's alert rules")
    for name, tree in monitoring.dashboard_configmaps(values).items():
        out[f"configmap.dashboard-{name}.yaml"] = (tree, f"Grafana dashboard `{name}` for the sidecar")
    out["job.dashboards-push.yaml"] = (monitoring.dashboards_push_job(values), "pushes the dashboards to Grafana's API")
    return out


def job_resources(values: DeployValues) -> dict[str, tuple[dict, str]]:
    return {
        f"rayjob.{name}.yaml": (rayjob(values, name), f"pipelines.{name} on its own cluster")
        for name in PIPELINES
        if name in values.jobs
    }


def _text(tree: dict, description: str) -> str:
    return emit(tree, f"{tree['kind']} {tree['metadata']['name']}: {description}.\n{FOOTER}")


def checked(values: DeployValues) -> DeployValues:
    """`values` validated again (presets edit dataclasses after construction)."""
    return from_dict(DeployValues, to_dict(values))


def render_manifests(values: DeployValues | None = None, *, overlays: bool = True) -> dict[str, str]:
    """Every file under k8s/ by path relative to it.

    Args:
        values: the base values (default: `DeployValues()`); the overlays derive from them.
        overlays: also render overlays/ (the presets); off for values that are already a
            production layout (the capacity planner's).
    """
    values = checked(values or DeployValues())
    files: dict[str, str] = {}
    platform = platform_resources(values)
    for file, (tree, description) in platform.items():
        files[f"base/{file}"] = _text(tree, description)
    files["base/kustomization.yaml"] = base_kustomization(values.namespace, list(platform))
    for file, (tree, description) in job_resources(values).items():
        files[f"base/jobs/{file}"] = _text(tree, description)
    base_plain = {file: plain(tree) for file, (tree, _) in platform.items()}
    for preset, derive in (PRESETS if overlays else {}).items():
        try:
            preset_values = checked(derive(values))
            platform_resources(preset_values)
        except ConfigError as exc:
            raise ConfigError(f"overlay {preset}: {exc} (render without overlays, or change the values)") from None
        overlay_plain = {file: plain(tree) for file, (tree, _) in platform_resources(preset_values).items()}
        doc = (derive.__doc__ or preset).strip().splitlines()[0]
        for file, text in overlay_files(
            preset, f"Overlay {preset}: {doc}", preset_values.namespace, base_plain, overlay_plain
        ).items():
            files[f"overlays/{preset}/{file}"] = text
        for file, (tree, description) in job_resources(preset_values).items():
            files[f"overlays/{preset}/jobs/{file}"] = _text(tree, description)
    return files


def write_manifests(files: dict[str, str], out_dir: str | Path) -> list[Path]:
    """Writes `files` under `out_dir` (each atomically) and removes rendered YAML files that are no
    longer rendered; returns the written paths."""
    from raymoe.atomic_io import atomic_write_bytes

    out_dir = Path(out_dir)
    stale = set(out_dir.rglob("*.yaml")) - {out_dir / f for f in files} if out_dir.is_dir() else set()
    for path in stale:
        os.remove(path)
    return [atomic_write_bytes(out_dir / f, text.encode()) for f, text in sorted(files.items())]


def stale_files(files: dict[str, str], out_dir: str | Path) -> list[str]:
    """Paths under `out_dir` that differ from `files`, are missing, or are no longer rendered."""
    out_dir = Path(out_dir)
    problems = [
        f for f, text in sorted(files.items()) if not (out_dir / f).is_file() or (out_dir / f).read_text() != text
    ]
    if out_dir.is_dir():
        problems += sorted(
            str(p.relative_to(out_dir)) for p in out_dir.rglob("*.yaml") if str(p.relative_to(out_dir)) not in files
        )
    return problems
