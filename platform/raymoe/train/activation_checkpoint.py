"""Activation checkpointing applied from outside: each transformer block recomputes in backward.

The block's `forward` is wrapped on the instance (parameter names and the model code stay as
they are). Non-reentrant checkpointing replays the block in backward, including its all-to-alls,
in the same order on every rank, so expert parallelism keeps working.
"""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from raymoe.models.transformer import MoETransformer


def apply_activation_checkpointing(model: MoETransformer) -> None:
    """Wraps every `model.layers[i].forward` in `torch.utils.checkpoint` (use_reentrant=False)."""
    for layer in model.layers:
        if getattr(layer, "_raymoe_checkpointed", False):
            continue
        inner = layer.forward

        @functools.wraps(inner)
        def wrapped(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = wrapped
        # torch types Module.__setattr__'s value as Tensor | Module; a plain flag is stored as is.
        layer._raymoe_checkpointed = True  # type: ignore[assignment]
