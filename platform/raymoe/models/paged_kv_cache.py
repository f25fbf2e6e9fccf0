"""Paged KV cache: KV memory as a pool of fixed-size blocks, handed to sequences as they grow.

`KVCache` reserves a full `max_seq_len` row per slot up front: a replica whose requests may reach
2048 tokens pays for 2048 positions per running sequence even when they use 256. Here each layer's
keys/values live in a pool of `num_blocks` blocks of `block_size` positions (PagedAttention, Kwon
et al., 2023, "Efficient Memory Management for LLM Serving with PagedAttention"). The scheduler
hands a sequence a block when its tokens reach it and takes its blocks back when it ends or is
preempted (`raymoe.serve.scheduler`); before each step the engine writes every scheduled slot's
blocks into the block table (`assign`). Memory is `num_blocks x block_size` positions however
many slots there are, so at the same memory a replica runs as many sequences as their actual
lengths fit, not as many as `max_seq_len` fits.

A forward pass gathers each row's blocks into a contiguous (B, kv_len, ...) tensor (one copy of
the keys the attention reads anyway), so the attention code is the same as over `KVCache`.
Positions beyond a slot's blocks (the right padding of a prompt group, a short row beside a long
one in a decode batch) map to one spare block that no sequence owns: what is written there is
never read unmasked.

Shapes: P pool blocks (+1 spare), K block size, N slots, M blocks per slot (max_seq_len / K),
B rows, T new tokens, Hkv kv heads, Dh head dim, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.models.config import ModelConfig
from raymoe.models.kv_cache import attention_mask, checked_kv_len


class PagedKVCache:
    """Per-layer block pools: GQA (k, v) as (P+1, K, Hkv, Dh); MLA (latent (P+1, K, C), k_rot (P+1, K, R)).

    Same interface as `KVCache` (`view`, `nbytes`, `num_slots`, `max_seq_len`) plus `assign`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_slots: int,
        max_seq_len: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if min(num_slots, max_seq_len, num_blocks, block_size) < 1:
            raise ValueError(
                "PagedKVCache needs num_slots, max_seq_len, num_blocks and block_size >= 1, got "
                f"{num_slots}, {max_seq_len}, {num_blocks}, {block_size}"
            )
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks_per_slot = -(-max_seq_len // block_size)
        self.spare = num_blocks  # the pool's extra last block
        self.table_NM = torch.full((num_slots, self.blocks_per_slot), self.spare, dtype=torch.long, device=device)
        self._assigned: list[list[int]] = [[] for _ in range(num_slots)]
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _ in range(cfg.num_layers):
            if cfg.attention == "mla":
                first = torch.zeros(num_blocks + 1, block_size, cfg.kv_lora_rank, dtype=dtype, device=device)
                second = torch.zeros(num_blocks + 1, block_size, cfg.qk_rope_head_dim, dtype=dtype, device=device)
            else:
                shape = (num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim)
                first = torch.zeros(shape, dtype=dtype, device=device)
                second = torch.zeros(shape, dtype=dtype, device=device)
            self.layers.append((first, second))

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers)

    def assign(self, slot: int, block_ids: list[int]) -> None:
        """Makes `block_ids` (in position order) the blocks of `slot`; later positions go spare."""
        if block_ids == self._assigned[slot]:
            return  # the common case: a decode whose sequence did not cross into a new block
        if len(block_ids) > self.blocks_per_slot:
            raise ValueError(f"slot {slot}: {len(block_ids)} blocks exceed max_seq_len={self.max_seq_len}")
        if block_ids and not 0 <= min(block_ids) <= max(block_ids) < self.num_blocks:
            raise ValueError(f"slot {slot}: block ids {block_ids} outside the pool 0..{self.num_blocks - 1}")
        row_M = self.table_NM[slot]
        row_M.fill_(self.spare)
        row_M[: len(block_ids)] = torch.tensor(block_ids, dtype=torch.long)
        self._assigned[slot] = list(block_ids)

    def view(self, slot_ids_B: torch.Tensor, positions_BT: torch.Tensor) -> PagedCacheView:
        """Binds this cache to one forward pass: where each new token goes, which blocks are read."""
        kv_len = checked_kv_len(slot_ids_B, positions_BT, self.max_seq_len)
        blocks_BM = self.table_NM.index_select(0, slot_ids_B)[:, : -(-kv_len // self.block_size)]
        mask_B1TS, causal = attention_mask(positions_BT, kv_len)
        return PagedCacheView(
            cache=self,
            read_blocks=blocks_BM.reshape(-1),
            write_block_BT=blocks_BM.gather(1, positions_BT // self.block_size),
            write_offset_BT=positions_BT % self.block_size,
            batch=positions_BT.shape[0],
            kv_len=kv_len,
            mask_B1TS=mask_B1TS,
            causal=causal,
        )


@dataclass
class PagedCacheView:
    """A PagedKVCache seen by one forward pass (the interface of `CacheView`)."""

    cache: PagedKVCache
    read_blocks: torch.Tensor  # (B * blocks covering kv_len), row after row
    write_block_BT: torch.Tensor
    write_offset_BT: torch.Tensor
    batch: int
    kv_len: int
    mask_B1TS: torch.Tensor | None  # None: no masking needed (see `causal`)
    causal: bool

    def _read(self, pool: torch.Tensor) -> torch.Tensor:
        """Each row's blocks side by side: (B, kv_len, ...)."""
        gathered = pool.index_select(0, self.read_blocks)
        return gathered.view(self.batch, -1, *pool.shape[2:])[:, : self.kv_len]

    def _write(self, pool: torch.Tensor, new_BTX: torch.Tensor) -> None:
        pool[self.write_block_BT, self.write_offset_BT] = new_BTX.to(pool.dtype)

    def update_heads(self, layer_id: int, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor):
        """GQA: writes new keys/values, returns this batch's (k, v) as (B, Hkv, kv_len, Dh)."""
        k_pool, v_pool = self.cache.layers[layer_id]
        self._write(k_pool, k_BTHD)
        self._write(v_pool, v_BTHD)
        return self._read(k_pool).transpose(1, 2), self._read(v_pool).transpose(1, 2)

    def update_latent(self, layer_id: int, latent_BTC: torch.Tensor, k_rot_BTR: torch.Tensor):
        """MLA: writes the latent and rotary key, returns them as (B, kv_len, C) and (B, kv_len, R)."""
        latent_pool, rot_pool = self.cache.layers[layer_id]
        self._write(latent_pool, latent_BTC)
        self._write(rot_pool, k_rot_BTR)
        return self._read(latent_pool), self._read(rot_pool)
