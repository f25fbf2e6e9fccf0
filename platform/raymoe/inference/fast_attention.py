"""Inference-only attention paths, handed to a built model's attention layers from outside.

- `fuse_qkv`: a GQA layer's q/k/v projections become one `FusedQKV` (one weight read and one GEMM
  call per step instead of three; each output row is the same dot product as before).
- `ThreadedDecodeAttention`: an `attend` (see `raymoe.models.attention.AttendFn`) that splits a
  CPU decode step's rows over the shared threads (`raymoe.inference.cpu_threads`) once the step
  reads many cached keys. Rows are independent, so the result is the same as in one call; reading
  a long cache is most of a long-context decode step, and one thread's small batched GEMMs do not
  reach the memory's bandwidth.

The model's layers keep their maths (`raymoe.models.attention`); these only replace how a layer
projects q/k/v (`qkv_proj`) and which `attend` it calls (`attend_fn`).

Shapes: B batch, T new tokens, S keys (cached + new), D model dim, H heads, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from raymoe.inference.cpu_threads import SharedThreads
from raymoe.models.attention import GQAttention, attend, decode_attend, is_cpu_decode
from raymoe.models.kv_cache import CacheView

# Decode attention is split over the shared threads from this many (rows x cached keys) on.
# `bench.bench_decode_attention` (batch 32, 2 threads): 100 keys per row gain nothing, 300 make
# the step 1.2x faster, 900 1.35x.
THREADED_DECODE_MIN_ROW_KEYS = 8192


class FusedQKV(nn.Module):
    """q, k and v projections as one `nn.Linear` whose output is split: returns (q, k, v)."""

    def __init__(self, linear: nn.Linear, widths: list[int]):
        super().__init__()
        self.linear = linear
        self.widths = widths

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.linear(x_BTD).split(self.widths, dim=-1))


def can_fuse_qkv(attn: GQAttention) -> bool:
    """Whether q/k/v are still three plain `nn.Linear` (not fused, not LoRA-wrapped)."""
    return all(type(p) is nn.Linear for p in (attn.q_proj, attn.k_proj, attn.v_proj))


@torch.no_grad()
def fuse_qkv(attn: GQAttention) -> None:
    """Replaces `attn`'s q/k/v_proj by one `qkv_proj` (a `FusedQKV`), in place; inference only.

    Raises:
        ValueError: a projection is not a plain `nn.Linear` (already fused, or LoRA-wrapped).
    """
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    if not can_fuse_qkv(attn):
        raise ValueError(f"fuse_qkv needs plain nn.Linear projections, got {[type(p).__name__ for p in parts]}")
    q = attn.q_proj
    fused = nn.Linear(
        q.in_features,
        sum(p.out_features for p in parts),
        bias=q.bias is not None,
        device=q.weight.device,
        dtype=q.weight.dtype,
    )
    fused.weight.copy_(torch.cat([p.weight for p in parts]))
    if q.bias is not None:
        fused.bias.copy_(torch.cat([p.bias for p in parts]))
    attn.qkv_proj = FusedQKV(fused, [p.out_features for p in parts])
    for name in ("q_proj", "k_proj", "v_proj"):
        attn.register_module(name, None)  # the name stays, holding None: `qkv_proj` replaces it


class ThreadedDecodeAttention:
    """`attend` with long CPU decode steps split over `threads` (set as a layer's `attend_fn`)."""

    def __init__(self, threads: SharedThreads):
        self.threads = threads

    def __call__(self, q_BHTD, k_BHSD, v_BHSD, cache: CacheView | None, scale: float, gqa: bool) -> torch.Tensor:
        B, S = q_BHTD.shape[0], k_BHSD.shape[2]
        if self.threads.count > 1 and B > 1 and B * S >= THREADED_DECODE_MIN_ROW_KEYS and is_cpu_decode(q_BHTD):
            mask = None if cache is None else cache.mask_B1TS
            return self._decode_on_threads(q_BHTD, k_BHSD, v_BHSD, mask, scale)
        return attend(q_BHTD, k_BHSD, v_BHSD, cache, scale, gqa)

    def _decode_on_threads(self, q_BH1D, k_BHSD, v_BHSD, mask_B11S, scale: float) -> torch.Tensor:
        """`decode_attend` over chunks of rows taken by the shared threads."""
        B = q_BH1D.shape[0]
        out_BH1D = q_BH1D.new_empty(B, q_BH1D.shape[1], 1, v_BHSD.shape[-1])
        chunks = min(B, 2 * self.threads.count)  # more chunks than threads: a late thread takes fewer

        def run_chunk(i: int) -> None:
            rows = slice(i * B // chunks, (i + 1) * B // chunks)
            mask = None if mask_B11S is None else mask_B11S[rows]
            out_BH1D[rows] = decode_attend(q_BH1D[rows], k_BHSD[rows], v_BHSD[rows], mask, scale)

        self.threads.run(chunks, run_chunk)
        return out_BH1D
