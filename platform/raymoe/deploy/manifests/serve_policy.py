"""Serving autoscaling policy: Serve replica autoscaling and the Ray autoscaler bounds, in one place.

Serve adds a replica when the requests in flight per replica (running in the engine plus queued in
front of it: the queue depth) stay above `target_ongoing_requests` for `upscale_delay_s`, and
removes one when they stay below for `downscale_delay_s`
(docs.ray.io/en/latest/serve/autoscaling-guide.html; defaults from `ray.serve.config.AutoscalingConfig`,
Ray 2.60: target 2, upscale_delay_s 30, downscale_delay_s 600, look_back_period_s 30).

The target is derived from the TTFT SLO. A replica runs `engine.num_slots` sequences at once; a
request arriving when all are busy waits for a slot. Slots free at about `num_slots / request_s`
per second, so the k-th request in the queue starts after about `k * request_s / num_slots` and
sees its first token `prefill_s` later. The deepest queue that still meets the SLO is
`k = floor((ttft_slo_s - prefill_s) * num_slots / request_s)`, and the target per replica is
`num_slots + k` (never above `max_ongoing_requests`, never below 1).

The Ray autoscaler must be able to place `max_replicas` replicas: the RayService's serving worker
group gets `minReplicas = ceil(min_replicas / per_node)` and `maxReplicas = ceil(max_replicas /
per_node)`, where `per_node` is how many replicas (each with its expert-shard workers when ep > 1)
fit in one worker pod's CPUs and GPUs (or, for a replica whose shard workers need more than one
pod, `nodes_per_replica` pods per replica).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raymoe.config import ConfigError
from raymoe.deploy.manifests.values import PodResources, ServeValues


@dataclass(frozen=True)
class ServePlan:
    """What the RayService renders: Serve's autoscaling_config and the serving group's bounds."""

    autoscaling: dict
    replicas_per_node: int
    nodes_per_replica: int
    min_nodes: int
    max_nodes: int


def target_ongoing_requests(
    num_slots: int, ttft_slo_s: float, request_s: float, prefill_s: float, max_ongoing_requests: int
) -> float:
    """Requests in flight per replica that keep a queued request's TTFT within the SLO.

    Args:
        num_slots: sequences one engine decodes together.
        ttft_slo_s: time-to-first-token objective, seconds.
        request_s: seconds a request holds a slot (prefill + decode) at full batch.
        prefill_s: seconds of a request's prefill.
        max_ongoing_requests: the replica's hard cap (Serve queues beyond it in the handle).

    Returns:
        The target as a float (Serve accepts fractional targets).
    """
    queue_ok = math.floor(max(0.0, ttft_slo_s - prefill_s) * num_slots / request_s)
    return float(max(1, min(max_ongoing_requests, num_slots + queue_ok)))


def replica_footprint(app: dict) -> tuple[float, float]:
    """(CPUs, GPUs) one replica takes, its expert-shard workers included."""
    ep = int(app.get("ep", 1))
    cpus = float(app.get("num_cpus", 1.0))
    gpus = float(app.get("num_gpus", 0.0))
    if ep > 1:
        cpus += ep * float(app.get("shard_num_cpus", 1.0))
        gpus += ep * float(app.get("shard_num_gpus", 0.0))
    return cpus, gpus


def placement(app: dict, worker: PodResources) -> tuple[int, int]:
    """(replicas per serving pod, pods per replica): one of them is 1.

    A replica with expert-shard workers (ep > 1) may span pods; one without must fit in one pod.
    Raises ConfigError naming both sides when it cannot be placed.
    """
    cpus, gpus = replica_footprint(app)
    node_cpus = worker.num_cpus()
    if cpus <= 0:
        raise ConfigError(f"serve: a replica must ask for CPUs, got num_cpus={app.get('num_cpus')}")
    fits = math.floor(node_cpus / cpus)
    if gpus > 0:
        fits = min(fits, math.floor(worker.gpu / gpus) if worker.gpu else 0)
    if fits >= 1:
        return int(fits), 1
    if int(app.get("ep", 1)) == 1 or (gpus > 0 and worker.gpu == 0):
        raise ConfigError(
            f"serve: one replica needs {cpus:g} CPU and {gpus:g} GPU (num_cpus/num_gpus plus ep x "
            f"shard resources) but serve.worker offers {node_cpus} CPU and {worker.gpu} GPU"
        )
    spans = max(math.ceil(cpus / node_cpus), math.ceil(gpus / worker.gpu) if gpus > 0 else 1)
    return 1, spans


def plan_serving(serve: ServeValues) -> ServePlan:
    """Serve autoscaling config and serving worker-group bounds from the serve values."""
    app, s = serve.app, serve.scaling
    engine = app.get("engine", {})
    target = target_ongoing_requests(
        int(engine.get("num_slots", 8)),
        s.ttft_slo_s,
        s.request_s,
        s.prefill_s,
        int(app.get("max_ongoing_requests", 32)),
    )
    per_node, spans = placement(app, serve.worker)
    autoscaling = {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": target,
        "upscale_delay_s": s.upscale_delay_s,
        "downscale_delay_s": s.downscale_delay_s,
    }
    return ServePlan(
        autoscaling=autoscaling,
        replicas_per_node=per_node,
        nodes_per_replica=spans,
        min_nodes=math.ceil(s.min_replicas / per_node) * spans,
        max_nodes=math.ceil(s.max_replicas / per_node) * spans,
    )
