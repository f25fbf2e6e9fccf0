"""What one training worker will need in memory, and whether that fits its limit.

A worker of an `ep x dp` layout holds the dense weights and 1/ep of the routed experts
(`raymoe.parallel.shard_memory.shard_bytes`). Training adds a gradient and two AdamW moments per
parameter, so its tensors take about 4x its parameter bytes (`TRAIN_BYTES_PER_PARAM_BYTE`).
`check_fits` compares that estimate, before anything is allocated, with the worker's memory limit
(`memory_per_worker_gb`, or the process's RLIMIT_AS headroom), so a layout that cannot fit fails
with a message naming the numbers instead of being killed by the kernel half-way through
materialising.
"""

from __future__ import annotations

import torch

from raymoe.models.transformer import MoETransformer
from raymoe.parallel.shard_memory import GIB, WorkerMemoryError, experts_per_layer, memory_limits, shard_bytes

# Parameter + gradient + AdamW exp_avg + exp_avg_sq, all in the parameter's dtype.
TRAIN_BYTES_PER_PARAM_BYTE = 4


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (AdamW: moments and step counters)."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


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
    for limit, what in memory_limits(memory_per_worker_gb, address_space):
        if need > limit:
            raise WorkerMemoryError(
                f"layout {layout}: a worker holding the dense weights ({held.dense / GIB:.2f} GiB) "
                f"and {experts_per_layer(model)} per MoE layer "
                f"({held.experts / GIB:.2f} GiB) needs ~{need / GIB:.2f} GiB for parameters, "
                f"gradients and AdamW state, more than {what} ({limit / GIB:.2f} GiB); raise "
                f"layout.ep so each worker holds fewer experts"
            )
    return need
