"""Whether a serving shard worker's share of the model fits its memory limit, checked before loading.

A shard worker of an `ep` layout holds the dense weights and its expert slots, in the dtype it
serves; `raymoe.models.load_hf` reads only those, tensor by tensor. `check_shard_fits` runs on the
meta-device model `load_hf` has built (its `check` hook), before any tensor is allocated or read,
and compares those parameter bytes with the worker's limits (`raymoe.parallel.shard_memory`: a
configured budget, this process's RLIMIT_AS headroom). A layout that cannot fit is refused with
the layout, the estimate and the limit named, instead of an allocation failing half-way through
the load or the kernel killing the worker. The KV cache is sized later (`make_cache`) and is not
part of the estimate.
"""

from __future__ import annotations

from raymoe.models.transformer import MoETransformer
from raymoe.parallel.shard_memory import GIB, WorkerMemoryError, experts_per_layer, memory_limits, shard_bytes


def check_shard_fits(
    model: MoETransformer, *, layout: str, memory_per_worker_gb: float = 0.0, address_space: bool = True
) -> int:
    """Fails before loading when this shard worker's parameters cannot fit its limit.

    Args:
        model: the worker's model as `load_hf` built it: on the meta device, holding its experts.
        layout: how the message names the layout, e.g. "ep=1".
        memory_per_worker_gb: the configured budget (0 = none).
        address_space: also check this process's RLIMIT_AS headroom.

    Returns:
        The estimated bytes (dense weights + this worker's experts, in the model's dtype).

    Raises:
        WorkerMemoryError: naming the layout, the estimate, its parts and the limit.
    """
    held = shard_bytes(model)
    for limit, what in memory_limits(memory_per_worker_gb, address_space):
        if held.total > limit:
            dtype = next(model.parameters()).dtype
            raise WorkerMemoryError(
                f"layout {layout}: a serving shard worker holding the dense weights "
                f"({held.dense / GIB:.2f} GiB) and {experts_per_layer(model)} per MoE layer "
                f"({held.experts / GIB:.2f} GiB) in {str(dtype).removeprefix('torch.')} needs "
                f"~{held.total / GIB:.2f} GiB before its KV cache, more than {what} "
                f"({limit / GIB:.2f} GiB); raise ep so each shard worker holds fewer experts"
            )
    return held.total


def check_layout_fits(model_path: str, ep: int, redundant_experts: list[int], memory_per_worker_gb: float) -> None:
    """The driver's check, before any replica starts: rank 0's share of the layout (every rank
    holds as many slots) against `memory_per_worker_gb`, from the artifact's config alone.

    Raises:
        WorkerMemoryError: as `check_shard_fits`.
    """
    import torch

    from raymoe.models.hf_io import read_hf_config
    from raymoe.parallel.layout import ExpertPlacement, keep_placed_experts

    cfg, _ = read_hf_config(model_path)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    keep_placed_experts(model, ExpertPlacement.with_redundant(cfg.moe.num_experts, ep, list(redundant_experts)))
    check_shard_fits(model, layout=f"ep={ep}", memory_per_worker_gb=memory_per_worker_gb, address_space=False)
