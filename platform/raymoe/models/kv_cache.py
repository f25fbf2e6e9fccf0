"""Slot-based KV cache for incremental decoding and continuous batching.

Each sequence owns a slot (a row) of a fixed-size buffer, so memory is reserved up front and a
serving scheduler admits a request only when a slot is free. New keys/values are written at their
absolute positions; a query attends to every key of its slot at a position <= its own, so stale
entries beyond a sequence's length are never read (they are overwritten before they could be).
MLA layers cache the compressed latent and the shared rotary key (DeepSeek-V2 section 2.1),
not per-head keys and values.

Shapes: N slots, S max sequence length, Hkv kv heads, Dh head dim, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.models.config import ModelConfig


class KVCache:
    """Per-layer cache tensors: GQA (k, v) as (N, Hkv, S, Dh); MLA (latent (N, S, C), k_rot (N, S, R))."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_slots: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_seq_len >= 1, got {num_slots}, {max_seq_len}")
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _ in range(cfg.num_layers):
            if cfg.attention == "mla":
                first = torch.zeros(num_slots, max_seq_len, cfg.kv_lora_rank, dtype=dtype, device=device)
                second = torch.zeros(num_slots, max_seq_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
            else:
                shape = (num_slots, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
                first = torch.zeros(shape, dtype=dtype, device=device)
                second = torch.zeros(shape, dtype=dtype, device=device)
            self.layers.append((first, second))

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers)

    def view(self, slot_ids_B: torch.Tensor, positions_BT: torch.Tensor) -> CacheView:
        """Binds this cache to one forward pass; computes the shared mask once for all layers."""
        kv_len = checked_kv_len(slot_ids_B, positions_BT, self.max_seq_len)
        B = positions_BT.shape[0]
        first_slot = int(slot_ids_B[0])
        contiguous = torch.equal(slot_ids_B, torch.arange(first_slot, first_slot + B, device=slot_ids_B.device))
        mask_B1TS, causal = attention_mask(positions_BT, kv_len)
        rows = slice(first_slot, first_slot + B) if contiguous else None
        return CacheView(self, slot_ids_B, positions_BT, kv_len, mask_B1TS, causal, rows)


def checked_kv_len(slot_ids_B: torch.Tensor, positions_BT: torch.Tensor, max_seq_len: int) -> int:
    """Keys a forward pass reads (its highest position + 1), after checking its rows and positions."""
    if slot_ids_B.shape[0] != positions_BT.shape[0]:
        raise ValueError(f"slot_ids has {slot_ids_B.shape[0]} rows but positions has {positions_BT.shape[0]}")
    kv_len = int(positions_BT.max()) + 1
    if kv_len > max_seq_len:
        raise ValueError(f"position {kv_len - 1} is beyond the cache's max_seq_len={max_seq_len}")
    return kv_len


def attention_mask(positions_BT: torch.Tensor, kv_len: int) -> tuple[torch.Tensor | None, bool]:
    """(mask_B1TS, causal) for queries at `positions_BT` over keys 0..kv_len-1: a query sees the
    keys at positions <= its own. Fast paths (no mask tensor): one new token per row at the same
    position sees every key; a prompt starting at position 0 in every row is plain causal."""
    B, T = positions_BT.shape
    aligned = torch.equal(positions_BT, positions_BT[:1].expand(B, T))
    if aligned and T == 1:
        return None, False
    if aligned and kv_len == T:
        return None, True
    key_pos = torch.arange(kv_len, device=positions_BT.device)
    return (key_pos[None, None, :] <= positions_BT[:, :, None])[:, None], False


@dataclass
class CacheView:
    """A KVCache seen by one forward pass: which slots, which positions, the attention mask."""

    cache: KVCache
    slot_ids_B: torch.Tensor
    positions_BT: torch.Tensor
    kv_len: int
    mask_B1TS: torch.Tensor | None  # None: no masking needed (see `causal`)
    causal: bool
    rows: slice | None  # the slots as a contiguous range, read without a gather copy

    def _read(self, cache_tensor: torch.Tensor) -> torch.Tensor:
        # Both layouts keep the sequence on dim -2: GQA (N, Hkv, S, Dh), MLA (N, S, C|R).
        if self.rows is not None:
            return cache_tensor[self.rows, ..., : self.kv_len, :]
        return cache_tensor[..., : self.kv_len, :].index_select(0, self.slot_ids_B)

    def update_heads(self, layer_id: int, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor):
        """GQA: writes new keys/values, returns this batch's (k, v) as (B, Hkv, kv_len, Dh)."""
        k_cache, v_cache = self.cache.layers[layer_id]
        rows = self.slot_ids_B[:, None].expand_as(self.positions_BT)
        k_cache[rows, :, self.positions_BT] = k_BTHD.to(k_cache.dtype)
        v_cache[rows, :, self.positions_BT] = v_BTHD.to(v_cache.dtype)
        return self._read(k_cache), self._read(v_cache)

    def update_latent(self, layer_id: int, latent_BTC: torch.Tensor, k_rot_BTR: torch.Tensor):
        """MLA: writes the latent and rotary key, returns them as (B, kv_len, C) and (B, kv_len, R)."""
        latent_cache, rot_cache = self.cache.layers[layer_id]
        rows = self.slot_ids_B[:, None].expand_as(self.positions_BT)
        latent_cache[rows, self.positions_BT] = latent_BTC.to(latent_cache.dtype)
        rot_cache[rows, self.positions_BT] = k_rot_BTR.to(rot_cache.dtype)
        return self._read(latent_cache), self._read(rot_cache)
