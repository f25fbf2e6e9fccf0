"""One optimizer step on one worker: forward/backward over micro-batches, sync, clip, update.

Loss = cross-entropy (mean over this worker's tokens) + the MoE layers' aux terms (balance loss,
z-loss; zero unless enabled in MoEConfig). Gradients are made those of the mean over all workers
(raymoe.parallel.grad_sync), clipped by the global norm, then AdamW steps. The aux-loss-free
balance bias moves by the tokens-per-expert counts summed over every worker, so every worker
applies the same update and the routers stay identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raymoe.models.transformer import MoETransformer
from raymoe.parallel.grad_sync import clip_gradients, sync_gradients
from raymoe.parallel.groups import ParallelGroups
from raymoe.train.config import OptimConfig
from raymoe.train.fused_lm_loss import linear_cross_entropy


@dataclass
class StepResult:
    """What one step did, already reduced over all workers (same values on every worker)."""

    loss: float  # mean cross-entropy over all workers' tokens
    aux_loss: float
    grad_norm: float  # global, before clipping
    lr: float
    tokens: int  # tokens processed by all workers
    tokens_per_expert_LE: torch.Tensor  # (MoE layers, E), summed over workers and micro-batches
    all_to_all_bytes: int  # bytes this worker sent to ep peers (forward)
    all_to_all_seconds: float  # this worker's forward all-to-all time


def build_optimizer(model: MoETransformer, cfg: OptimConfig) -> torch.optim.AdamW:
    """Fused AdamW; matrices (including stacked experts) decay, vectors (norms, biases) do not.

    The fused kernel (CPU and CUDA) updates every parameter in one call. Its vectorised loop
    rounds an element differently depending on where it falls in a tensor, so a layout that
    splits the stacked experts differently agrees with one process to ~1e-6 relative per
    tensor, not bit for bit (tests/unit/test_train_equivalence.py: tolerance 1e-5); a resumed run
    is still bit-identical to an uninterrupted one.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def _autocast(device: torch.device, bf16: bool):
    # CPU autocast too: on CPUs with AMX / AVX512-BF16 (what `train.precision: auto` asks for)
    # bf16 GEMMs run several times faster than fp32.
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _lm_loss(model: MoETransformer, h_ND: torch.Tensor, targets_N: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy of the LM head's logits (float32 math) over h_ND's rows."""
    head = model.lm_head
    if type(head) is nn.Linear and head.bias is None:
        return linear_cross_entropy(h_ND, head.weight, targets_N, reduction)
    # An LM head wrapped by an adapter: logits first.
    return F.cross_entropy(head(h_ND).float(), targets_N, reduction=reduction)


def train_step(
    model: MoETransformer,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[torch.Tensor, ...]],
    *,
    groups: ParallelGroups,
    lr: float,
    clip_norm: float,
    bf16: bool = False,
    update_bias: bool = True,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    global_target_counts: list[int] | None = None,
) -> StepResult:
    """Runs one optimizer step over this worker's micro-batches.

    Args:
        model: the (expert-sharded) model, in train mode.
        optimizer: from `build_optimizer`.
        micro_batches: [(input_ids_BT, targets_BT[, count_mask_BT])], the worker's share of each
            global micro-batch; the optional bool mask marks real (non-padding) tokens, which
            alone count in the tokens-per-expert statistics.
        groups: this worker's process groups.
        lr: learning rate for this step.
        clip_norm: max global gradient norm (0 = no clipping).
        bf16: autocast to bf16 (fp32 weights, gradients and optimizer state; the routers and
            the loss stay fp32).
        update_bias: move the routers' aux-loss-free balance bias (off when the base is frozen,
            as in LoRA fine-tuning).
        extra_loss: a term added to every micro-batch's loss (FedProx's proximal term).
        global_target_counts: per micro-batch, the targets that carry loss over all workers. When
            given, the loss is the mean over those tokens of the whole micro-batch (not the mean
            of each worker's mean): fine-tuning batches hold different numbers of answer tokens
            per worker, and this keeps any layout equal to one process.

    Returns:
        The step's globally reduced statistics.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    moe_layers = list(model.moe_layers())
    counts_LE = (
        torch.zeros(len(moe_layers), moe_layers[0].cfg.num_experts, dtype=torch.long, device=device)
        if moe_layers
        else torch.zeros(0, 0, dtype=torch.long)
    )
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    aux_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    n = len(micro_batches)
    for index, (input_ids_BT, targets_BT, *rest) in enumerate(micro_batches):
        input_ids_BT, targets_BT = input_ids_BT.to(device), targets_BT.to(device)
        count_mask_BT = rest[0].to(device) if rest else None
        with _autocast(device, bf16):
            h_BTD = model.hidden_states(input_ids_BT, count_mask_BT=count_mask_BT)
            if global_target_counts is None:
                ce = _lm_loss(model, h_BTD.reshape(-1, h_BTD.shape[-1]), targets_BT.reshape(-1), "mean")
            else:
                # Only the targets that carry loss need logits: the LM head runs on those rows alone.
                keep_BT = targets_BT != -100
                # Scaled by world: the gradient sync and the reported loss average over workers.
                ce = _lm_loss(model, h_BTD[keep_BT], targets_BT[keep_BT], "sum") * (
                    groups.world_size / max(global_target_counts[index], 1)
                )
        aux = model.aux_loss().to(device)
        loss = ce + aux if extra_loss is None else ce + aux + extra_loss()
        (loss / n).backward()
        ce_sum += ce.detach().double()
        aux_sum += aux.detach().double()
        tokens += targets_BT.numel()
        if moe_layers:
            counts_LE += torch.stack([m.last_tokens_per_expert_E.to(device) for m in moe_layers])

    sync_gradients(model, groups)
    grad_norm = clip_gradients(model, groups, clip_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()

    totals = torch.stack([ce_sum / n, aux_sum / n, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    if groups.distributed:
        # One collective for both: counts are integers far below 2**53, exact in float64.
        packed = torch.cat([totals, counts_LE.reshape(-1).to(torch.float64)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        totals = packed[:3].clone()
        totals[:2] /= groups.world_size
        counts_LE = packed[3:].round().to(torch.long).reshape(counts_LE.shape)
    for moe, counts_E in zip(moe_layers, counts_LE):
        if moe.cfg.balance_bias and update_bias:
            moe.router.update_bias(counts_E)

    a2a_bytes, a2a_seconds = 0, 0.0
    for moe in moe_layers:
        stats = getattr(moe.dispatcher, "stats", None)
        if stats is not None:
            snap = stats.reset()
            a2a_bytes += snap.bytes_sent
            a2a_seconds += snap.seconds
    return StepResult(
        loss=float(totals[0]),
        aux_loss=float(totals[1]),
        grad_norm=grad_norm,
        lr=lr,
        tokens=int(totals[2]),
        tokens_per_expert_LE=counts_LE.cpu(),
        all_to_all_bytes=a2a_bytes,
        all_to_all_seconds=a2a_seconds,
    )
