"""What a silo sends back after a round, and the checks the server runs on it before aggregating.

Parameters are LoRA adapter tensors keyed by Hugging Face / peft names (`dict[str, Tensor]`,
float32, CPU). Routed-expert adapters carry `layers.{L}.<block>.experts.{E}.` in their name, e.g.
`base_model.model.model.layers.1.block_sparse_moe.experts.3.w1.lora_A.weight`; attention and
shared-expert adapters do not.

Validation happens here, at the edge: an update that fails a check is rejected with a reason and
counted (never silently dropped), so the strategies downstream can trust shapes, finiteness and
counts. Shape legend: L model layers, E routed experts per layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

Params = dict[str, torch.Tensor]

REJECT_MISSING_TENSOR = "missing_tensor"
REJECT_WRONG_SHAPE = "wrong_shape"
REJECT_NON_FINITE = "non_finite"
REJECT_NORM = "norm_exceeded"
REJECT_BAD_COUNTS = "bad_counts"

_EXPERT_RE = re.compile(r"layers\.(\d+)\.[^.]+\.experts\.(\d+)\.")


def expert_of(name: str) -> tuple[int, int] | None:
    """(layer, expert) of a routed-expert adapter tensor name, or None for any other tensor."""
    match = _EXPERT_RE.search(name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


@dataclass
class ClientUpdate:
    """One silo's result for one round.

    Attributes:
        silo: the silo's name.
        params: the silo's adapter after local training (full values, not a delta).
        num_examples: training examples the silo used this round; the FedAvg weight.
        tokens_per_expert_LE: int64 (L, E), tokens the silo routed to each routed expert, indexed by
            model layer; rows of dense layers are zero. The MoE-aware weight of expert tensors.
        metrics: silo-side scalars (loss, ...), passed through for logging.
    """

    silo: str
    params: Params
    num_examples: int
    tokens_per_expert_LE: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def flatten(params: Params) -> torch.Tensor:
    """All tensors as one 1-D vector, concatenated in sorted key order."""
    return torch.nn.utils.parameters_to_vector([params[k] for k in sorted(params)])


def unflatten(vec: torch.Tensor, like: Params) -> Params:
    """Inverse of `flatten`: split `vec` back into `like`'s keys and shapes (views into `vec`)."""
    keys = sorted(like)
    chunks = vec.split([like[k].numel() for k in keys])
    return {k: chunk.view_as(like[k]) for k, chunk in zip(keys, chunks, strict=True)}


def update_norm(params: Params, global_params: Params) -> float:
    """L2 norm of (params - global_params) over all tensors together, as one vector."""
    keys = sorted(global_params)
    deltas = torch._foreach_sub([params[k] for k in keys], [global_params[k] for k in keys])
    return float(torch.nn.utils.get_total_norm(deltas, norm_type=2.0))


def check_update(
    update: ClientUpdate, global_params: Params, max_update_norm: float | None, expected_counts_shape: tuple[int, int]
) -> str | None:
    """Why `update` must not be aggregated, or None when it is fine.

    Args:
        update: the silo's result.
        global_params: the parameters the silo was sent this round.
        max_update_norm: reject when `update_norm(params, global_params)` is above this; None
            disables the check.
        expected_counts_shape: (L, E) that `tokens_per_expert_LE` must have.

    Returns:
        One of the `REJECT_*` reasons, or None.
    """
    params = update.params
    if params.keys() != global_params.keys():
        return REJECT_MISSING_TENSOR
    if any(params[k].shape != global_params[k].shape for k in global_params):
        return REJECT_WRONG_SHAPE
    if not all(bool(torch.isfinite(t).all()) for t in params.values()):
        return REJECT_NON_FINITE
    counts = update.tokens_per_expert_LE
    if (
        update.num_examples < 1
        or counts.dtype != torch.int64
        or tuple(counts.shape) != tuple(expected_counts_shape)
        or bool((counts < 0).any())
    ):
        return REJECT_BAD_COUNTS
    # Checked last: the norm of an update with missing, misshapen or NaN tensors means nothing.
    if max_update_norm is not None and update_norm(params, global_params) > max_update_norm:
        return REJECT_NORM
    return None


def filter_updates(
    updates: list[ClientUpdate],
    global_params: Params,
    max_update_norm: float | None,
    expected_counts_shape: tuple[int, int],
) -> tuple[list[ClientUpdate], dict[str, list[str]]]:
    """Split updates into the accepted ones and the rejected silos grouped by reason.

    Returns:
        (accepted updates in input order, {reason: [silo, ...]} holding only reasons that occurred).
    """
    accepted: list[ClientUpdate] = []
    rejected: dict[str, list[str]] = {}
    for update in updates:
        reason = check_update(update, global_params, max_update_norm, expected_counts_shape)
        if reason is None:
            accepted.append(update)
        else:
            rejected.setdefault(reason, []).append(update.silo)
    return accepted, rejected
