"""The namespace, with Pod Security Admission enforcing the `restricted` standard, and the shared
data volume claim."""

from __future__ import annotations

from raymoe.deploy.manifests import pods
from raymoe.deploy.manifests.values import DeployValues
from raymoe.deploy.manifests.yaml_text import Note


def namespace(values: DeployValues) -> dict:
    psa = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")}
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": values.namespace,
            "labels": Note(
                dict(pods.labels(values, "namespace"), **psa),
                "The API server refuses any pod here that runs as root, escalates\n"
                "privileges, keeps capabilities or mounts host paths.",
            ),
        },
    }


def data_claim(values: DeployValues) -> dict:
    spec = {
        "accessModes": Note(
            ["ReadWriteMany"],
            "Pods on different nodes share it: ingest writes shards train\n"
            "reads, train exports the model serve loads, serve writes traffic drift reads.",
        ),
        "resources": {"requests": {"storage": values.storage.size}},
    }
    if values.storage.storage_class:
        spec["storageClassName"] = values.storage.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": values.storage.claim_name,
            "namespace": values.namespace,
            "labels": pods.labels(values, "storage"),
        },
        "spec": spec,
    }
