"""The two overlays' values, derived from the base values: what changes for a CPU-only development
cluster and for a GPU production cluster. `kustomize.py` turns the difference into patches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from raymoe.deploy.manifests.values import DeployValues, PodResources, WorkerGroupValues


def cpu_dev(base: DeployValues) -> DeployValues:
    """A small CPU-only cluster in its own namespace: no GPU group, half-size pods."""
    v = copy.deepcopy(base)
    v.namespace = f"{base.namespace}-dev"
    v.head = PodResources(cpu="1", memory="4Gi")
    v.worker_groups = [
        WorkerGroupValues(name="cpu", min_replicas=0, max_replicas=2, resources=PodResources(cpu="2", memory="8Gi"))
    ]
    v.silo_resources = PodResources(cpu="1", memory="4Gi")
    v.autoscaler.idle_timeout_s = 30
    v.storage.size = "20Gi"
    v.serve.app["num_cpus"] = 1.0
    v.serve.worker = PodResources(cpu="2", memory="8Gi")
    v.serve.scaling.max_replicas = 2
    return v


def gpu_prod(base: DeployValues) -> DeployValues:
    """GPU serving and training, GCS fault tolerance, more headroom."""
    v = copy.deepcopy(base)
    v.image = f"{base.image}-gpu"
    v.head = PodResources(cpu="4", memory="16Gi")
    v.worker_groups = [
        WorkerGroupValues(name="cpu", min_replicas=2, max_replicas=8, resources=PodResources(cpu="8", memory="32Gi")),
        WorkerGroupValues(
            name="gpu", min_replicas=0, max_replicas=8, resources=PodResources(cpu="12", memory="96Gi", gpu=1)
        ),
    ]
    v.gcs_ft.redis_address = f"{base.name}-redis:6379"
    v.storage.size = "1Ti"
    v.jobs["train"].overrides.append("use_gpu=true")
    v.serve.app.update(num_cpus=4.0, num_gpus=1.0)
    v.serve.worker = PodResources(cpu="8", memory="64Gi", gpu=1)
    v.serve.scaling.min_replicas = 2
    v.serve.scaling.max_replicas = 8
    return v


PRESETS: dict[str, Callable[[DeployValues], DeployValues]] = {"cpu-dev": cpu_dev, "gpu-prod": gpu_prod}
