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

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from raymoe.parallel.groups import ParallelGroups


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Returns (dense, expert) trainable parameters; experts are those of `model.moe_layers()`."""
    expert_ids = {
        id(p) for moe in model.moe_layers() for p in moe.experts.parameters() if p.requires_grad
    }
    dense, expert = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (expert if id(p) in expert_ids else dense).append(p)
    return dense, expert


def _all_reduce_sum_scaled(
    params: Iterable[nn.Parameter], scale: float, *, group=None, reduce: bool = True
) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    # One flat buffer per call: one collective instead of one per tensor.
    flat = torch.cat([g.reshape(-1) for g in grads])
    if reduce:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.mul_(scale)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
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


def global_grad_norm(model: nn.Module, groups: ParallelGroups) -> float:
    """L2 norm of the whole model's gradient, each parameter counted once across shards."""
    dense, expert = split_parameters(model)
    dense_sq = _sum_sq(dense)
    expert_sq = _sum_sq(expert)
    if groups.ep_group is not None:
        dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=groups.ep_group)
    return math.sqrt(float(dense_sq + expert_sq))


def clip_gradients(model: nn.Module, groups: ParallelGroups, max_norm: float) -> float:
    """Scales all gradients by min(1, max_norm / (norm + 1e-6)) like `clip_grad_norm_`.

    Returns:
        The global norm before clipping.
    """
    norm = global_grad_norm(model, groups)
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm


def _sum_sq(params: list[nn.Parameter]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            total = total + p.grad.detach().to(torch.float64).pow(2).sum().cpu()
    if params and params[0].is_cuda:
        total = total.to(params[0].device)
    return total
