"""A RayJob per pipeline: KubeRay creates a cluster, submits the pipeline's entrypoint to it, and
deletes the cluster when the job ends.

The entrypoint is the same command line as a local run (`python -m pipelines.<name> --config
FILE key=value ...`); tests/integration/test_k8s_entrypoints.py submits the rendered entrypoints
through Ray's Jobs API to a local cluster, as KubeRay's submitter does. Reference: KubeRay sample
ray-job.pytorch-distributed-training.yaml.
"""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from raymoe.deploy.manifests import pods
from raymoe.deploy.manifests.raycluster import WORKER_SA, cluster_spec, sa_name, silo_groups, worker_group
from raymoe.deploy.manifests.values import DeployValues, JobValues, PodResources
from raymoe.deploy.manifests.yaml_text import Note

# Exit status of `pipelines.drift` when it finds drift or quality decay (pipelines/drift.py).
DRIFT_EXIT = 3


def entrypoint(name: str, job: JobValues) -> str:
    """The shell command KubeRay submits: the pipeline, then any follow-up commands."""
    commands = [["python", "-m", f"pipelines.{name}", "--config", job.config, *job.overrides], *job.then]
    return " && ".join(shlex.join(c) for c in commands)


def submitter_template(values: DeployValues) -> dict:
    """The pod that runs `ray job submit` (KubeRay fills in the command); no API token."""
    volumes, mounts = pods.writable_volumes(values, data=False, shm=False)
    container = {
        "name": "ray-job-submitter",
        "image": values.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": pods.resources(PodResources(cpu="500m", memory="512Mi")),
        "securityContext": pods.container_security(),
        "volumeMounts": mounts,
    }
    return pods.one_shot_pod_template(
        values, container, component="job-submitter", service_account=sa_name(values, WORKER_SA), volumes=volumes
    )


def rayjob_spec(values: DeployValues, name: str) -> dict:
    job = values.jobs[name]
    groups = [worker_group(values, g, component=f"job-{name}") for g in values.worker_groups]
    if name == "federated":
        groups += [worker_group(values, g, component=f"job-{name}") for g in silo_groups(values)]
    backoff_why = (
        f"Exit {DRIFT_EXIT} means drift was found (the job shows Failed): a retry would only\nfind it again."
        if name == "drift"
        else "Whole-job retries, each on a new cluster (a training retry resumes from the\n"
        "newest checkpoint on the shared volume)."
    )
    return {
        "entrypoint": entrypoint(name, job),
        "submissionMode": Note(
            "K8sJobMode",
            "A Kubernetes Job submits the entrypoint once the cluster is ready and\n"
            "follows its logs; the job itself runs on the head as a Ray driver.",
        ),
        "runtimeEnvYAML": Note(
            yaml.safe_dump({"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, sort_keys=True),
            "The same environment the local runs set (raymoe.ray_runtime).",
        ),
        "shutdownAfterJobFinishes": Note(True, "The cluster exists for this job only: delete it when the job ends."),
        "ttlSecondsAfterFinished": Note(
            job.ttl_after_finished_s, "Keep the finished cluster this long for logs and the dashboard."
        ),
        "activeDeadlineSeconds": Note(
            job.active_deadline_s, "A hung job is failed and its cluster freed after this many seconds."
        ),
        "backoffLimit": Note(job.backoff_limit, backoff_why),
        "submitterConfig": Note(
            {"backoffLimit": 2},
            "Retries of the submitter pod only (a transient API or network error);\n"
            "it checks the job's status first, so it never submits twice.",
        ),
        "submitterPodTemplate": submitter_template(values),
        "rayClusterSpec": cluster_spec(values, groups, component=f"job-{name}"),
    }


def rayjob(values: DeployValues, name: str, *, object_name: str | None = None, namespace: bool = True) -> dict:
    """The RayJob for pipeline `name` (one of values.jobs)."""
    metadata: dict[str, Any] = {"name": object_name or f"{values.name}-{name}"}
    if namespace:
        metadata["namespace"] = values.namespace
    metadata["labels"] = pods.labels(values, f"job-{name}")
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata, "spec": rayjob_spec(values, name)}
