"""Rotary position embedding (RoFormer, Su et al. 2021) with YaRN scaling (Peng et al. 2023).

YaRN follows DeepSeek-V3's released inference code and `transformers.modeling_rope_utils`:
frequencies are blended between interpolated and extrapolated with a linear ramp over the
correction range, and cos/sin are multiplied by an attention factor
`mscale(factor, mscale) / mscale(factor, mscale_all_dim)`.

Shapes: B batch, T tokens, R rotary dims (even).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raymoe.models.config import RopeConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context extended by `factor`."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(cfg: RopeConfig, rot_dim: int) -> tuple[torch.Tensor, float]:
    base = cfg.theta
    pos_freqs = base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (cfg.factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        return (rot_dim * math.log(cfg.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(cfg.beta_slow)), rot_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    if cfg.mscale and cfg.mscale_all_dim:
        attention_factor = yarn_mscale(cfg.factor, cfg.mscale) / yarn_mscale(cfg.factor, cfg.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(cfg.factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables for positions and rotates query/key rotary dims."""

    inv_freq: torch.Tensor  # buffer, (R/2,) float32

    def __init__(self, cfg: RopeConfig, rot_dim: int):
        super().__init__()
        self.interleaved = cfg.interleaved
        if cfg.scaling == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(cfg, rot_dim)
        else:
            inv_freq = 1.0 / (cfg.theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
            self.attention_factor = 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cos, sin), each (B, T, R/2) in float32, already scaled by the attention factor."""
        angles = positions_BT.to(torch.float32)[..., None] * self.inv_freq
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates x (B, T, heads, R) by per-position angles; cos/sin are (B, T, R/2).

    Interleaved inputs hold pairs (x0, y0, x1, y1, ...); the output is in half layout
    (x0.., y0..) either way. q and k get the same permutation, so their dot product is unchanged.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos = cos[:, :, None, :].to(x.dtype)
    sin = sin[:, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
