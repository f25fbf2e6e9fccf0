"""Gradient synchronisation and the true global gradient norm for an `ep x dp` layout.

Scaling (why expert gradients are not simply averaged over their replicas): every rank's loss is
the mean over its own tokens and the global loss is the mean of the ranks' losses, so the right
gradient is (1 / world) * sum over ranks of d(loss_rank)/dW.
- Dense weights live on every rank and see only local tokens: all-reduce SUM over all ranks,
  divide by world = mean.
- An expert's weights on its owner already hold the summed contributions of every ep peer's tokens
  (the backward all-to-all brought them back); summing over its dp replicas covers every rank once,
  so: all-reduce SUM over the dp group, divide by world (= ep * dp), not by dp.
With ep = 1 both rules coincide with plain data parallelism.

The clip norm counts every parameter once: dense weights (identical on all ranks after the sync)
are taken from the local copy; expert weights are summed over the ep group, which holds each expert
exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from raymoe.parallel.groups import ParallelGroups
from raymoe.parallel.layout import MoEModel


def split_parameters(model: MoEModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Returns (dense, expert) trainable parameters; experts are those of `model.moe_layers()`."""
    expert_ids = {id(p) for moe in model.moe_layers() for p in moe.experts.parameters() if p.requires_grad}
    dense: list[nn.Parameter] = []
    expert: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (expert if id(p) in expert_ids else dense).append(p)
    return dense, expert


# Gradients are all-reduced in buckets of at most this many bytes (DDP's default size): a few
# collectives instead of one per tensor, and at most one bucket of extra memory instead of a flat
# copy of every gradient. A tensor larger than a bucket is reduced in place.
BUCKET_BYTES = 25 * 2**20


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if buckets[-1] and size + nbytes > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += nbytes
    return buckets


def _all_reduce_sum_scaled(params: Iterable[nn.Parameter], scale: float, *, group=None, reduce: bool = True) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if not reduce:
        torch._foreach_mul_(grads, scale)
        return
    for bucket in _buckets(grads):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM, group=group)
            bucket[0].mul_(scale)
            continue
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.mul_(scale)
        parts = flat.split([g.numel() for g in bucket])
        torch._foreach_copy_(bucket, [part.view_as(g) for part, g in zip(parts, bucket)])


def sync_gradients(model: MoEModel, groups: ParallelGroups) -> None:
    """Makes every rank's gradients those of the global mean loss (see module docstring).

    Parameters that got no gradient this step (p.grad is None) are given zeros first so all ranks
    take part in the same collectives with the same buffer sizes.
    """
    if not groups.distributed:
        return
    dense, expert = split_parameters(model)
    for p in dense + expert:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = groups.world_size
    _all_reduce_sum_scaled(dense, 1.0 / world)
    # dp == 1: the expert sum over replicas is the local gradient itself (only the scale remains).
    _all_reduce_sum_scaled(expert, 1.0 / world, group=groups.dp_group, reduce=groups.layout.dp > 1)


def global_grad_norm(model: MoEModel, groups: ParallelGroups) -> torch.Tensor:
    """L2 norm of the whole model's gradient, each parameter counted once across shards."""
    dense, expert = split_parameters(model)
    device = next(model.parameters()).device
    dense_sq = _norm(dense, device).double() ** 2
    expert_sq = _norm(expert, device).double() ** 2
    if groups.ep_group is not None:
        dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=groups.ep_group)
    return (dense_sq + expert_sq).sqrt()


def clip_gradients(model: MoEModel, groups: ParallelGroups, max_norm: float) -> float:
    """Scales all gradients by min(1, max_norm / (norm + 1e-6)) like `clip_grad_norm_`.

    Returns:
        The global norm before clipping.
    """
    norm = global_grad_norm(model, groups)
    if max_norm > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.float())
    return float(norm)


def _norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)
