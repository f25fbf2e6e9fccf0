"""Deploy values from the capacity planner: a plan (`raymoe plan --json`, schema raymoe.plan/v1, or
`raymoe.deploy.planner.plan` run here) sets the serving layout, pod shape, engine size, scaling
numbers and GPU worker group; everything else keeps the base values.

What a plan sets, and why:
- serving replica = `ep` expert-shard workers with one GPU each (`shard_num_gpus: 1`); the
  replica's own process needs no GPU. A serving pod takes one whole node (`gpus_per_node` GPUs),
  so a replica spans `nodes_per_replica` pods.
- engine.num_slots = decode batch per GPU x ep (the sequences one replica decodes together);
  max_ongoing_requests = 2 x num_slots so Serve's queue-depth target can exceed the slots.
- scaling: ttft_slo_s from the plan's TTFT target; prefill_s = one prefill step; request_s =
  prefill_s + output_len x decode step time; min_replicas = the plan's replicas, max = twice that.
- CPU and memory per GPU are not fleet properties: CPUS_PER_GPU and MEMORY_GIB_PER_GPU below are
  conservative shares of a DGX H100 node (112 cores, 2 TB for 8 GPUs; DGX H100 datasheet).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from raymoe.config import ConfigError
from raymoe.deploy.manifests.values import DeployValues, PodResources, WorkerGroupValues

PLAN_SCHEMA = "raymoe.plan/v1"
CPUS_PER_GPU = 8
MEMORY_GIB_PER_GPU = 100
# CPUs left on a serving node for the replica process, the Serve proxy and Ray's own daemons.
NODE_CPU_RESERVE = 4


def values_from_plan(plan: dict, base: DeployValues) -> DeployValues:
    """`base` with the serving layout and sizes of `plan` (a Plan.to_dict())."""
    if plan.get("schema") != PLAN_SCHEMA:
        raise ConfigError(f"plan schema {plan.get('schema')!r}: expected {PLAN_SCHEMA!r} (`raymoe plan --json`)")
    v = copy.deepcopy(base)
    ep, gpn = int(plan["layout"]["ep"]), int(plan["gpus_per_node"])
    num_slots = int(plan["decode"]["batch_per_gpu"]) * ep
    node = PodResources(cpu=str(CPUS_PER_GPU * gpn + NODE_CPU_RESERVE), memory=f"{MEMORY_GIB_PER_GPU * gpn}Gi", gpu=gpn)
    model = plan["model"]
    v.serve.app.update(
        model_path=v.storage.path("models", model),
        model_id=model,
        ep=ep,
        num_cpus=1.0,
        num_gpus=0.0,
        shard_num_gpus=1.0,
        shard_num_cpus=float(CPUS_PER_GPU),
        max_ongoing_requests=2 * num_slots,
        max_queued_requests=2 * num_slots,
        engine=dict(v.serve.app.get("engine", {}), num_slots=num_slots, max_waiting=num_slots),
    )
    if ep == 1:
        v.serve.app.update(num_gpus=1.0, num_cpus=float(CPUS_PER_GPU))
        for key in ("shard_num_gpus", "shard_num_cpus"):
            v.serve.app.pop(key)
    v.serve.worker = node
    prefill_s = float(plan["prefill"]["step_ms"]) / 1e3
    targets = plan["targets"]
    v.serve.scaling.ttft_slo_s = float(targets["ttft_ms"]) / 1e3
    v.serve.scaling.prefill_s = prefill_s
    v.serve.scaling.request_s = prefill_s + int(targets["output_len"]) * float(plan["decode"]["step_ms"]) / 1e3
    v.serve.scaling.min_replicas = max(1, int(plan["replicas"]))
    v.serve.scaling.max_replicas = 2 * v.serve.scaling.min_replicas
    v.worker_groups = [g for g in v.worker_groups if g.resources.gpu == 0] + [
        WorkerGroupValues(name="gpu", min_replicas=0, max_replicas=int(plan["nodes_per_replica"]) * 2, resources=node)
    ]
    return v


def load_plan(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plan file {str(path)!r} does not exist (write one with `raymoe plan --json FILE`)")
    return json.loads(path.read_text())


def plan_for(model: str, fleet: str) -> dict:
    """The planner's plan for `model` on `fleet` at its default targets, as plain data."""
    try:
        from raymoe.deploy.planner import PlanConfig, plan
    except ImportError as exc:
        raise ConfigError(f"--model/--fleet need the capacity planner (raymoe.deploy.planner): {exc}") from None
    return plan(PlanConfig(model=model, fleet=fleet)).to_dict()
