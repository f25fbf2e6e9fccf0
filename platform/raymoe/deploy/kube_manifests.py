"""Manifests `raymoe deploy` reads: the kinds it knows, the files a path means, one-line errors.

Which files are read, as `kubectl apply -f` / `-k` would:
- a file is applied as given, whatever its name or directory;
- a directory holding a kustomization (kustomization.yaml, .yml or Kustomization) is a kustomize
  base: exactly the files its `resources:` lists are applied, with its `namespace:`. A kustomization
  that patches (`patches`, `patchesStrategicMerge`, `patchesJson6902`) or builds on another
  directory (an overlay) is refused: only kustomize renders it right (`kubectl apply -k`);
- any other directory: every *.yaml / *.yml below it, except that a subdirectory holding a
  kustomization is refused (its patches and unlisted files, e.g. k8s/base/jobs, are not plain
  manifests to apply together).

Exit codes carried by `KubeError`: USER_ERROR (2) when the fix is in what the user runs or installs
(manifests, RBAC, CRDs, flags, kubeconfig); SERVER_ERROR (1) when the server is unreachable or
fails, or the workload does.

Reference: https://kubectl.docs.kubernetes.io/references/kustomize/kustomization/ (the
kustomization fields).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KUBERAY_VERSION = "v1.7.0"
USER_ERROR, SERVER_ERROR = 2, 1
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class KubeError(Exception):
    """A failed deploy step, as one line naming the object and what to do, with its exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class ObjectNotFound(KubeError):
    """The object itself does not exist (its kind and namespace do)."""


@dataclass(frozen=True)
class Kind:
    """A kind `raymoe deploy` knows: its REST plural and the client API that serves it.

    `typed` is (API class in kubernetes.client, method stem) for built-in kinds, e.g.
    ("CoreV1Api", "namespaced_config_map"); None means CustomObjectsApi (a CRD-backed kind, whose
    `install` says what to install when the CRD is missing). A kind that is not `namespaced`
    (Namespace) lives at the cluster scope: its objects have no namespace.
    """

    api_version: str
    kind: str
    plural: str
    typed: tuple[str, str] | None = None
    install: str = ""
    namespaced: bool = True

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    @property
    def resource(self) -> str:
        """`plural.group` as RBAC and CRD names spell it (`rayclusters.ray.io`, `configmaps`)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


_KUBERAY = f"KubeRay CRD {{resource}} not installed: install the KubeRay operator {KUBERAY_VERSION}"
_PROM_OPERATOR = "CRD {resource} not installed: install the Prometheus Operator CRDs"

# In apply order: the namespace everything else lives in, identity and permissions, config and
# networking, monitoring, the Ray workloads, then the batch jobs that call them. Delete runs it
# backwards, so the namespace goes last.
KINDS: dict[tuple[str, str], Kind] = {
    (k.api_version, k.kind): k
    for k in (
        Kind("v1", "Namespace", "namespaces", ("CoreV1Api", "namespace"), namespaced=False),
        Kind("v1", "ServiceAccount", "serviceaccounts", ("CoreV1Api", "namespaced_service_account")),
        Kind("rbac.authorization.k8s.io/v1", "Role", "roles", ("RbacAuthorizationV1Api", "namespaced_role")),
        Kind(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            "rolebindings",
            ("RbacAuthorizationV1Api", "namespaced_role_binding"),
        ),
        Kind("v1", "ConfigMap", "configmaps", ("CoreV1Api", "namespaced_config_map")),
        Kind(
            "v1", "PersistentVolumeClaim", "persistentvolumeclaims", ("CoreV1Api", "namespaced_persistent_volume_claim")
        ),
        Kind("v1", "Service", "services", ("CoreV1Api", "namespaced_service")),
        Kind(
            "networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", ("NetworkingV1Api", "namespaced_network_policy")
        ),
        Kind("monitoring.coreos.com/v1", "PodMonitor", "podmonitors", install=_PROM_OPERATOR),
        Kind("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors", install=_PROM_OPERATOR),
        Kind("monitoring.coreos.com/v1", "PrometheusRule", "prometheusrules", install=_PROM_OPERATOR),
        Kind("ray.io/v1", "RayCluster", "rayclusters", install=_KUBERAY),
        Kind("ray.io/v1", "RayService", "rayservices", install=_KUBERAY),
        Kind("ray.io/v1", "RayJob", "rayjobs", install=_KUBERAY),
        Kind("batch/v1", "CronJob", "cronjobs", ("BatchV1Api", "namespaced_cron_job")),
        Kind("batch/v1", "Job", "jobs", ("BatchV1Api", "namespaced_job")),
    )
}
_ORDER = [k.kind for k in KINDS.values()]


def kind_named(name: str) -> Kind:
    """The kind for a case-insensitive kind name or plural (`raycluster`, `rayjobs`)."""
    for kind in KINDS.values():
        if name.lower() in (kind.kind.lower(), kind.plural):
            return kind
    raise KubeError(
        f"unknown kind {name!r}: expected one of {', '.join(k.kind.lower() for k in KINDS.values())}", USER_ERROR
    )


@dataclass(frozen=True)
class Manifest:
    """One document of a manifest file: its kind, name, namespace (None: not set) and body."""

    kind: Kind
    name: str
    namespace: str | None
    body: dict[str, Any]
    source: str  # "path" or "path#index" for files with several documents

    @property
    def ref(self) -> str:
        return f"{self.kind.kind}/{self.name}"


def load_manifests(paths: Sequence[str | Path]) -> list[Manifest]:
    """Reads every document of the manifest files that `paths` name (see the module docstring for
    files, kustomization directories and other directories), in apply order (the namespace, RBAC
    and config first, Ray workloads last).

    Raises:
        KubeError: a path that is missing, a kustomize overlay or a kustomization that transforms
            objects, a file that does not parse, a document without apiVersion/kind/metadata.name,
            a kind `raymoe deploy` does not know, or the same object twice (USER_ERROR).
    """
    manifests: list[Manifest] = []
    seen: dict[tuple[str, str | None, str], str] = {}  # (kind, namespace, name) -> where
    for path in map(Path, paths):
        files, namespace = _manifest_files(path)
        for file in files:
            try:
                docs = [d for d in yaml.safe_load_all(file.read_text()) if d is not None]
            except yaml.YAMLError as exc:
                raise KubeError(f"{file}: not valid YAML: {exc}", USER_ERROR) from exc
            for i, doc in enumerate(docs):
                source = f"{file}#{i}" if len(docs) > 1 else str(file)
                manifest = _manifest(doc, source)
                if namespace and manifest.kind.namespaced:
                    if manifest.namespace not in (None, namespace):
                        # kustomize would move it (and fix up references to it); that is its job.
                        raise KubeError(
                            f"{source}: {manifest.ref} sets namespace {manifest.namespace!r} but "
                            f"{path}'s kustomization sets {namespace!r}: make them agree",
                            USER_ERROR,
                        )
                    manifest = dataclasses.replace(manifest, namespace=namespace)
                key = (manifest.kind.kind, manifest.namespace, manifest.name)
                if key in seen:
                    raise KubeError(f"{source}: {manifest.ref} is also defined in {seen[key]}", USER_ERROR)
                seen[key] = source
                manifests.append(manifest)
    if not manifests:
        raise KubeError(f"no Kubernetes objects in {', '.join(map(str, paths))}", USER_ERROR)
    return sorted(manifests, key=lambda m: _ORDER.index(m.kind.kind))


KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")  # kustomize's names
_OVERLAY_FIELDS = ("patches", "patchesStrategicMerge", "patchesJson6902")
# Every other kustomization field (namePrefix, labels, images, configMapGenerator, components, ...)
# changes or adds objects; only kustomize does that right, so such a kustomization is refused.
_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "metadata", "resources", "namespace", *_OVERLAY_FIELDS}


def _manifest_files(path: Path) -> tuple[list[Path], str | None]:
    """The files `path` stands for and the namespace its kustomization sets (None: no kustomization)."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise KubeError(f"{path}: no such file or directory", USER_ERROR)
    if (kustomization := _kustomization_file(path)) is not None:
        return _kustomization_resources(path, kustomization)
    nested = sorted({p.parent for p in path.rglob("*") if p.name in KUSTOMIZATION_FILES and p.is_file()})
    if nested:
        raise KubeError(
            f"{nested[0]} holds a kustomization: apply it on its own (`raymoe deploy apply "
            f"{nested[0]}`), not as part of {path}",
            USER_ERROR,
        )
    return sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()), None


def _kustomization_file(directory: Path) -> Path | None:
    found = [directory / name for name in KUSTOMIZATION_FILES if (directory / name).is_file()]
    if len(found) > 1:
        raise KubeError(
            f"{directory}: several kustomization files ({', '.join(f.name for f in found)}): "
            "kustomize refuses that too; keep one",
            USER_ERROR,
        )
    return found[0] if found else None


def _kustomization_resources(directory: Path, file: Path) -> tuple[list[Path], str | None]:
    """The files a kustomize base (`directory`, its kustomization `file`) lists in `resources:`,
    and its `namespace:`."""
    try:
        doc = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise KubeError(f"{file}: not valid YAML: {exc}", USER_ERROR) from exc
    if not isinstance(doc, dict) or doc.get("kind", "Kustomization") != "Kustomization":
        raise KubeError(
            f"{file}: expected a kustomization (kind Kustomization, apiVersion kustomize.config.k8s.io/v1beta1)",
            USER_ERROR,
        )
    resources = doc.get("resources") or []
    if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
        raise KubeError(f"{file}: resources must be a list of paths", USER_ERROR)
    # A resource that is a directory (or a remote one) is a base this kustomization builds on.
    bases = [r for r in resources if (directory / r).is_dir() or "://" in r or r.startswith("github.com/")]
    if bases or any(field in doc for field in _OVERLAY_FIELDS):
        local = [os.path.normpath(directory / r) for r in bases if (directory / r).is_dir()]
        hint = f", or apply its base with `raymoe deploy apply {' '.join(local)}`" if local else ""
        raise KubeError(
            f"{directory} is a kustomize overlay: apply it with `kubectl apply --server-side -k {directory}`{hint}",
            USER_ERROR,
        )
    if transforms := sorted(set(doc) - _KUSTOMIZATION_FIELDS):
        raise KubeError(
            f"{file} uses {', '.join(transforms)}: only kustomize renders that; apply it with "
            f"`kubectl apply --server-side -k {directory}`",
            USER_ERROR,
        )
    namespace = doc.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise KubeError(f"{file}: namespace must be a name, got {namespace!r}", USER_ERROR)
    files, root = [], directory.resolve()
    for resource in resources:
        target = directory / resource
        if not target.is_file():
            raise KubeError(f"{file}: resource {resource!r} is not a file in {directory}", USER_ERROR)
        if not target.resolve().is_relative_to(root):
            raise KubeError(
                f"{file}: resource {resource!r} is outside {directory} (kustomize refuses it too)", USER_ERROR
            )
        files.append(target)
    return files, namespace


def _manifest(doc: Any, source: str) -> Manifest:
    if isinstance(doc, dict) and (
        doc.get("kind") in ("Kustomization", "Component")
        or str(doc.get("apiVersion")).startswith("kustomize.config.k8s.io/")
    ):
        raise KubeError(
            f"{source} is a kustomization, not a Kubernetes object: apply its directory "
            f"(`raymoe deploy apply {Path(source.partition('#')[0]).parent}`)",
            USER_ERROR,
        )
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
        raise KubeError(f"{source}: expected a Kubernetes object with apiVersion, kind and metadata", USER_ERROR)
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KINDS:
        known = ", ".join(f"{k.api_version} {k.kind}" for k in KINDS.values())
        raise KubeError(
            f"{source}: apiVersion {key[0]!r} kind {key[1]!r} is not one raymoe deploy applies (known: {known})",
            USER_ERROR,
        )
    name = doc["metadata"].get("name")
    if not isinstance(name, str) or not name:
        raise KubeError(f"{source}: {key[1]} has no metadata.name", USER_ERROR)
    kind = KINDS[key]
    # The API server ignores a namespace on a cluster-scoped object; so does raymoe deploy.
    namespace = doc["metadata"].get("namespace") if kind.namespaced else None
    return Manifest(kind, name, namespace, doc, source)


def target_namespace(manifest: Manifest, flag: str | None, default: str) -> str:
    """The namespace to use: --namespace, else the manifest's, else the kubeconfig context's;
    "" for a cluster-scoped kind (Namespace), whatever --namespace says, as kubectl does."""
    if not manifest.kind.namespaced:
        return ""
    if flag and manifest.namespace and flag != manifest.namespace:
        raise KubeError(
            f"{manifest.source}: {manifest.ref} sets namespace {manifest.namespace!r} but "
            f"--namespace is {flag!r}: drop one of them",
            USER_ERROR,
        )
    return flag or manifest.namespace or default
