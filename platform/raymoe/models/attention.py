"""Attention: grouped-query attention (Ainslie et al. 2023) and multi-head latent attention
(DeepSeek-V2, arXiv:2405.04434, section 2.1), both over an optional slot KV cache.

Follows the Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 modelling code so that
imported checkpoints give the same logits: Qwen2-MoE's q/k/v biases, Qwen3's per-head q/k RMSNorm,
DeepSeek-V3's low-rank queries, compressed kv latent, decoupled rotary key and YaRN softmax scale.

Shapes: B batch, T new tokens, S keys (cached + new), D model dim, H heads, Hkv kv heads,
Dh head dim, C kv_lora_rank, R rotary dims.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.models.config import ModelConfig
from raymoe.models.kv_cache import CacheView
from raymoe.models.norm import RMSNorm
from raymoe.models.rope import apply_rotary, yarn_mscale

# (q_BHTD, k_BHSD, v_BHSD, cache, scale, gqa) -> out_BHTD: how an attention layer combines its
# queries with the keys and values. `attend` is the default; an inference backend may hand a
# layer another with the same results (`raymoe.inference.fast_attention`).
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, CacheView | None, float, bool], torch.Tensor]


def attend(q_BHTD, k_BHSD, v_BHSD, cache: CacheView | None, scale: float, gqa: bool) -> torch.Tensor:
    """Scaled dot-product attention, causal or under the cache's mask; a one-query CPU step
    without autograd goes to `decode_attend`."""
    causal = cache is None or cache.causal
    mask = None if cache is None else cache.mask_B1TS
    if is_cpu_decode(q_BHTD):
        return decode_attend(q_BHTD, k_BHSD, v_BHSD, mask, scale)
    return F.scaled_dot_product_attention(
        q_BHTD, k_BHSD, v_BHSD, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )


def is_cpu_decode(q_BHTD: torch.Tensor) -> bool:
    """Whether `decode_attend` applies: one query per row, on CPU, without autograd."""
    return q_BHTD.shape[2] == 1 and q_BHTD.device.type == "cpu" and not torch.is_grad_enabled()


def decode_attend(q_BH1D, k_BHSD, v_BHSD, mask_B11S: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One query per row on CPU.

    float32: two batched GEMMs with each kv head's query heads as rows. A decode step has one
    query per row and its time goes to reading the cache; this reads each cached key/value once,
    where PyTorch's CPU SDPA tiles for long queries (measured on a 2-core Xeon at batch 8-32,
    256 positions: 5-15% faster than SDPA). Equal to SDPA up to summation order.

    bf16: PyTorch's SDPA with `enable_gqa`, which accumulates in float32 and takes a paged
    cache's strided blocks as they are (values as wide as the keys; MLA's expanded form falls
    back to the GEMMs). Its bf16 path is 1.5x (batch 32) to 7x (batch 1) faster
    than bf16 batched GEMMs at the serving shape on the same Xeon (AMX), and more accurate:
    bf16 GEMMs round the scores to bf16 before the softmax.
    """
    B, H, _, Dh = q_BH1D.shape
    Hkv = k_BHSD.shape[1]
    if q_BH1D.dtype != torch.float32 and v_BHSD.shape[-1] == Dh:
        return F.scaled_dot_product_attention(
            q_BH1D, k_BHSD, v_BHSD, attn_mask=mask_B11S, scale=scale, enable_gqa=Hkv != H
        )
    scores_BKGS = torch.matmul(q_BH1D.view(B, Hkv, H // Hkv, Dh), k_BHSD.transpose(-1, -2)) * scale
    if mask_B11S is not None:
        scores_BKGS = scores_BKGS.masked_fill(~mask_B11S, float("-inf"))
    out_BKGD = torch.matmul(scores_BKGS.softmax(dim=-1), v_BHSD)
    return out_BKGD.view(B, H, 1, v_BHSD.shape[-1])


class GQAttention(nn.Module):
    """Multi-head attention with fewer key/value heads than query heads."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.interleaved = cfg.rope.interleaved
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)
        # Inference backends may set a module that returns (q, k, v) in one call (one weight read)
        # in place of the three projections, and another `attend` (`raymoe.inference.fast_attention`).
        self.qkv_proj: nn.Module | None = None
        self.attend_fn: AttendFn = attend
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: CacheView | None):
        B, T, _ = x_BTD.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x_BTD)
        else:
            q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        q_BTHD = q.reshape(B, T, self.num_heads, self.head_dim)
        k_BTHD = k.reshape(B, T, self.num_kv_heads, self.head_dim)
        v_BTHD = v.reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (cfg.qk_norm)
            q_BTHD, k_BTHD = self.q_norm(q_BTHD), self.k_norm(k_BTHD)
        cos, sin = rope
        q_BTHD = apply_rotary(q_BTHD, cos, sin, self.interleaved)
        k_BTHD = apply_rotary(k_BTHD, cos, sin, self.interleaved)
        if cache is None:
            k_BHSD, v_BHSD = k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2)
        else:
            k_BHSD, v_BHSD = cache.update_heads(self.layer_id, k_BTHD, v_BTHD)
        gqa = self.num_kv_heads != self.num_heads
        out_BHTD = self.attend_fn(q_BTHD.transpose(1, 2), k_BHSD, v_BHSD, cache, self.scale, gqa)
        return self.o_proj(out_BHTD.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-head latent attention over a cached low-rank latent: prefill and training expand
    keys/values from it through kv_b_proj; a one-token decode step absorbs kv_b_proj into the
    query and the output instead (`_absorbed`), so its cost does not grow with re-expansion."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = cfg.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.interleaved = cfg.rope.interleaved
        qk_head_dim = self.nope_dim + self.rope_dim
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.num_heads * qk_head_dim, bias=False)
            self.q_proj = None
        else:
            self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, cfg.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * self.v_dim, cfg.dim, bias=False)
        self.scale = qk_head_dim**-0.5
        self.attend_fn: AttendFn = attend  # an inference backend may set another (see GQAttention)
        if cfg.rope.scaling == "yarn" and cfg.rope.mscale_all_dim:
            # DeepSeek-V3 folds YaRN's magnitude correction into the softmax scale.
            self.scale *= yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim) ** 2

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: CacheView | None):
        B, T, _ = x_BTD.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD))) if self.q_proj is None else self.q_proj(x_BTD)
        q_BTHQ = q.view(B, T, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rot = q_BTHQ.split([self.nope_dim, self.rope_dim], dim=-1)
        latent_BTC, k_rot_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent_BTC = self.kv_a_layernorm(latent_BTC)
        cos, sin = rope
        q_rot = apply_rotary(q_rot, cos, sin, self.interleaved)
        k_rot_BTR = apply_rotary(k_rot_BTR[:, :, None, :], cos, sin, self.interleaved)[:, :, 0]
        if cache is not None:
            latent_BTC, k_rot_BTR = cache.update_latent(self.layer_id, latent_BTC, k_rot_BTR)
        if T == 1 and not torch.is_grad_enabled() and type(self.kv_b_proj) is nn.Linear:
            out_BTHV = self._absorbed(q_nope, q_rot, latent_BTC, k_rot_BTR, cache)
            return self.o_proj(out_BTHV.reshape(B, T, -1))
        S = latent_BTC.shape[1]
        kv_BSHX = self.kv_b_proj(latent_BTC).view(B, S, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v_BSHD = kv_BSHX.split([self.nope_dim, self.v_dim], dim=-1)
        k_BSHQ = torch.cat((k_nope, k_rot_BTR[:, :, None, :].expand(B, S, self.num_heads, self.rope_dim)), dim=-1)
        q_BHTQ = torch.cat((q_nope, q_rot), dim=-1).transpose(1, 2)
        out_BHTD = self.attend_fn(q_BHTQ, k_BSHQ.transpose(1, 2), v_BSHD.transpose(1, 2), cache, self.scale, False)
        return self.o_proj(out_BHTD.transpose(1, 2).reshape(B, T, -1))

    def _absorbed(self, q_nope_BTHN, q_rot_BTHR, latent_BSC, k_rot_BSR, cache: CacheView | None) -> torch.Tensor:
        """Decode with kv_b_proj absorbed (DeepSeek-V2 section 2.1; vLLM's MLA decode): the query
        moves into the latent space, attention runs over the cached latent itself, and the
        value up-projection applies to the attended latent. Per step this reads the cache once
        instead of expanding every cached position through kv_b_proj; equal to the expanded form
        up to summation order. Returns (B, T, H, V)."""
        H, N = self.num_heads, self.nope_dim
        w_HXC = self.kv_b_proj.weight.view(H, N + self.v_dim, self.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w_HXC[:, :N], w_HXC[:, N:]
        q_lat_BHTC = torch.einsum("bthn,hnc->bhtc", q_nope_BTHN, w_uk_HNC)
        scores_BHTS = torch.matmul(q_lat_BHTC, latent_BSC[:, None].transpose(-1, -2)) + torch.matmul(
            q_rot_BTHR.transpose(1, 2), k_rot_BSR[:, None].transpose(-1, -2)
        )
        scores_BHTS = scores_BHTS * self.scale
        if cache is not None and cache.mask_B1TS is not None:
            scores_BHTS = scores_BHTS.masked_fill(~cache.mask_B1TS, float("-inf"))
        ctx_BHTC = torch.matmul(scores_BHTS.softmax(dim=-1), latent_BSC[:, None])
        return torch.einsum("bhtc,hvc->bthv", ctx_BHTC, w_uv_HVC)


def build_attention(cfg: ModelConfig, layer_id: int) -> nn.Module:
    return MLAttention(cfg, layer_id) if cfg.attention == "mla" else GQAttention(cfg, layer_id)
