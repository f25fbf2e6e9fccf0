"""Kustomize files: the base's kustomization and each overlay's JSON patches (RFC 6902).

An overlay is a second set of values (presets.py). Its patches are the difference between the
base render and the overlay render, resource by resource, so `kubectl kustomize
k8s/overlays/<name>` builds exactly what rendering the overlay's values directly gives (tested
with kubectl's built-in kustomize). Lists that change length are replaced whole: custom resources
have no merge keys, so index-wise patches of a changed list would be fragile.
"""

from __future__ import annotations

from typing import Any

from raymoe.deploy.manifests.yaml_text import Note, emit, emit_list


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def json_patch(old: Any, new: Any, path: str = "") -> list[dict]:
    """RFC 6902 operations that turn `old` into `new` (plain data)."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict] = []
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
            else:
                ops.extend(json_patch(old[key], new[key], f"{path}/{_escape(key)}"))
        for key in new:
            if key not in old:
                ops.append({"op": "add", "path": f"{path}/{_escape(key)}", "value": new[key]})
        return ops
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [op for i, (a, b) in enumerate(zip(old, new)) for op in json_patch(a, b, f"{path}/{i}")]
    if old == new and type(old) is type(new):
        return []
    return [{"op": "replace", "path": path, "value": new}]


def apply_patch(doc: Any, ops: list[dict]) -> Any:
    """Applies `json_patch` output (add/remove/replace) to a copy of `doc`; for tests and checks."""
    import copy

    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        if not parts:
            doc = copy.deepcopy(op["value"])
            continue
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        key = int(last) if isinstance(parent, list) else last
        if op["op"] == "remove":
            del parent[key]
        else:
            parent[key] = copy.deepcopy(op["value"])
    return doc


def _target(doc: dict) -> dict:
    group, _, version = doc["apiVersion"].rpartition("/")
    target = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    if not group:
        del target["group"]
    return target


def base_kustomization(namespace: str, files: list[str]) -> str:
    tree = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": Note(namespace, "Every resource file carries it too, so each also applies on its own."),
        "resources": files,
    }
    return emit(
        tree,
        "The raymoe platform on KubeRay: cluster, serving, schedule, monitoring, security.\n"
        "RayJobs are in jobs/ (created one at a time with `kubectl create -f`, not applied here).\n"
        "Rendered by `raymoe manifests render`; do not edit.",
    )


def overlay_files(
    name: str, description: str, namespace: str, base: dict[str, dict], overlay: dict[str, dict]
) -> dict[str, str]:
    """kustomization.yaml + one patch file per changed resource, keyed by file name.

    Args:
        name: the overlay's directory name.
        description: what the overlay is for (the kustomization's header).
        namespace: the overlay's namespace.
        base, overlay: plain resource trees by file name, rendered from the two sets of values;
            both must hold the same files.
    """
    if set(base) != set(overlay):
        raise ValueError(f"overlay {name}: base and overlay render different files: {sorted(set(base) ^ set(overlay))}")
    files: dict[str, str] = {}
    patches = []
    for file in sorted(base):
        old = dict(base[file], metadata={k: v for k, v in base[file]["metadata"].items() if k != "namespace"})
        new = dict(overlay[file], metadata={k: v for k, v in overlay[file]["metadata"].items() if k != "namespace"})
        ops = json_patch(old, new)
        if not ops:
            continue
        patch_file = file.replace(".yaml", ".patch.yaml")
        files[patch_file] = emit_list(ops, f"{name}: JSON patch (RFC 6902) of base/{file}; rendered, do not edit.")
        patches.append({"path": patch_file, "target": _target(base[file])})
    tree = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "resources": ["../../base"],
        "patches": patches,
    }
    files["kustomization.yaml"] = emit(tree, f"{description}\nRendered by `raymoe manifests render`; do not edit.")
    return files
