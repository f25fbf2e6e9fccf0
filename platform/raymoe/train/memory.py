"""What one training worker holds in memory, what it will need, and whether that fits its limit.

A worker of an `ep x dp` layout holds the dense weights and 1/ep of the routed experts. Training
adds a gradient and two AdamW moments per parameter, so its tensors take about 4x its parameter
bytes (`TRAIN_BYTES_PER_PARAM_BYTE`). `check_fits` compares that estimate, before anything is
allocated, with the worker's memory limit (`memory_per_worker_gb`, or the process's RLIMIT_AS
headroom), so a layout that cannot fit fails with a message naming the numbers instead of being
killed by the kernel half-way through materialising.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from raymoe.models.transformer import MoETransformer

# Parameter + gradient + AdamW exp_avg + exp_avg_sq, all in the parameter's dtype.
TRAIN_BYTES_PER_PARAM_BYTE = 4
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


def shard_bytes(model: MoETransformer) -> ShardBytes:
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


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (AdamW: moments and step counters)."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


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


def check_fits(
    model: MoETransformer, *, layout: str, memory_per_worker_gb: float = 0.0, address_space: bool = True
) -> int:
    """Fails before allocation when this worker's training tensors cannot fit its limit.

    Args:
        model: this worker's model, sharded, typically still on the meta device.
        layout: how the message names the layout, e.g. "ep=1 x dp=1".
        memory_per_worker_gb: the configured budget (0 = none).
        address_space: also check this process's RLIMIT_AS headroom (in the worker itself; not
            in a driver planning for workers elsewhere).

    Returns:
        The estimated bytes (parameters, gradients, AdamW state).

    Raises:
        WorkerMemoryError: naming the estimate, its parts and the limit.
    """
    held = shard_bytes(model)
    need = TRAIN_BYTES_PER_PARAM_BYTE * held.total
    limits = []
    if memory_per_worker_gb > 0:
        limits.append((int(memory_per_worker_gb * GIB), f"memory_per_worker_gb={memory_per_worker_gb}"))
    headroom = address_space_headroom() if address_space else None
    if headroom is not None:
        limits.append((headroom, "this process's RLIMIT_AS headroom"))
    for limit, what in limits:
        if need > limit:
            experts = [len(moe.experts.expert_ids) for moe in model.moe_layers()]
            num_experts = model.cfg.moe.num_experts
            raise WorkerMemoryError(
                f"layout {layout}: a worker holding the dense weights ({held.dense / GIB:.2f} GiB) "
                f"and {experts[0] if experts else 0} of {num_experts} experts per MoE layer "
                f"({held.experts / GIB:.2f} GiB) needs ~{need / GIB:.2f} GiB for parameters, "
                f"gradients and AdamW state, more than {what} ({limit / GIB:.2f} GiB); raise "
                f"layout.ep so each worker holds fewer experts"
            )
    return need
