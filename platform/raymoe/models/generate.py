"""Autoregressive generation as small named steps (after gpt-fast): prefill, decode_step, sample.

The serving engine (`raymoe.serve.engine`) schedules many sequences over these same steps; this
module also gives a plain `generate` for one batch, used by the demo, tests and benchmarks.

Shapes: B batch, T prompt tokens, V vocab.
"""

from __future__ import annotations

import torch

from raymoe.models.kv_cache import KVCache
from raymoe.models.transformer import MoETransformer


@torch.no_grad()
def prefill(
    model: MoETransformer, prompt_BT: torch.Tensor, cache: KVCache, slot_ids_B: torch.Tensor, start_pos: int = 0
) -> torch.Tensor:
    """Runs the prompt (or a chunk of it starting at `start_pos`) through the model, filling the
    cache; returns the logits of the last position (B, V)."""
    B, T = prompt_BT.shape
    positions_BT = torch.arange(start_pos, start_pos + T, device=prompt_BT.device).expand(B, T)
    return model(prompt_BT, positions_BT, cache, slot_ids_B)[:, -1]


@torch.no_grad()
def decode_step(
    model: MoETransformer, tokens_B: torch.Tensor, positions_B: torch.Tensor, cache: KVCache, slot_ids_B: torch.Tensor
) -> torch.Tensor:
    """One new token per sequence at its own position; returns logits (B, V)."""
    return model(tokens_B[:, None], positions_B[:, None], cache, slot_ids_B)[:, 0]


def sample(
    logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Greedy when temperature == 0, else softmax sampling (optionally from the top_k logits)."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / temperature
    if top_k:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: MoETransformer,
    prompt_BT: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continues every prompt by `max_new_tokens` tokens; returns only the new tokens (B, N)."""
    B, T = prompt_BT.shape
    cache = KVCache(
        model.cfg,
        num_slots=B,
        max_seq_len=T + max_new_tokens,
        dtype=next(model.parameters()).dtype,
        device=prompt_BT.device,
    )
    slots_B = torch.arange(B, device=prompt_BT.device)
    token_B = sample(prefill(model, prompt_BT, cache, slots_B), temperature, top_k, generator)
    out = [token_B]
    for step in range(1, max_new_tokens):
        positions_B = torch.full((B,), T + step - 1, device=prompt_BT.device)
        token_B = sample(decode_step(model, token_B, positions_B, cache, slots_B), temperature, top_k, generator)
        out.append(token_B)
    return torch.stack(out, dim=1)
