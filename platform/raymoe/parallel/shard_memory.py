"""What one worker of an expert-parallel layout holds in memory, and the limits it must fit.

A worker of an `ep` layout (a training rank, a serving shard worker) holds the dense weights and
its share of the routed experts. `shard_bytes` counts those parameter bytes on a model that may
still be on the meta device, so a caller can compare its own estimate (training multiplies it
by its optimizer state; serving holds the parameters alone) with `memory_limits` before anything
is allocated: the configured budget and this process's RLIMIT_AS headroom. The messages stay the
callers': they know what the bytes are for.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from raymoe.parallel.layout import MoEModel

GIB = 1024**3


class WorkerMemoryError(MemoryError):
    """The layout puts more on one worker than its memory limit allows."""


@dataclass
class ShardBytes:
    """Parameter bytes of one worker's model, split into dense and routed-expert tensors."""

    dense: int
    experts: int

    @property
    def total(self) -> int:
        return self.dense + self.experts


def shard_bytes(model: MoEModel) -> ShardBytes:
    """Parameter bytes `model` holds (works on the meta device: nothing is allocated)."""
    expert_ids = {id(p) for moe in model.moe_layers() for p in moe.experts.parameters()}
    dense = experts = 0
    for p in model.parameters():
        n = p.numel() * p.element_size()
        if id(p) in expert_ids:
            experts += n
        else:
            dense += n
    return ShardBytes(dense=dense, experts=experts)


def experts_per_layer(model: MoEModel) -> str:
    """'<held> of <num_experts> experts' of the first MoE layer, for messages."""
    held = [len(moe.experts.expert_ids) for moe in model.moe_layers()]
    return f"{held[0] if held else 0} of {model.cfg.moe.num_experts} experts"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; ru_maxrss where /proc is missing)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def address_space_headroom() -> int | None:
    """Bytes this process may still map under its RLIMIT_AS soft limit; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = (_status_kib("VmSize") or 0) * 1024
    return max(soft - used, 0)


def memory_limits(memory_per_worker_gb: float = 0.0, address_space: bool = True) -> list[tuple[int, str]]:
    """The limits a worker's estimate must fit, as (bytes, how a message names it).

    Args:
        memory_per_worker_gb: the configured budget (0 = none).
        address_space: also this process's RLIMIT_AS headroom (in the worker itself; not in a
            driver planning for workers elsewhere).
    """
    limits = []
    if memory_per_worker_gb > 0:
        limits.append((int(memory_per_worker_gb * GIB), f"memory_per_worker_gb={memory_per_worker_gb}"))
    headroom = address_space_headroom() if address_space else None
    if headroom is not None:
        limits.append((headroom, "this process's RLIMIT_AS headroom"))
    return limits
