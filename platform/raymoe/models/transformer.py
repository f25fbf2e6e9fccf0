"""The MoE transformer: pre-norm decoder blocks of attention + (MoE | dense SwiGLU) FFN.

Layout follows DeepSeek-V3 / Mixtral / Qwen-MoE (Hugging Face modelling code): embeddings,
`num_layers` blocks (the first `first_k_dense` with a dense FFN), final RMSNorm, LM head.
Parallelism is applied from outside (`raymoe.parallel`); this file holds the architecture only.

Built under `torch.device("meta")` the model allocates nothing (torchtitan's habit): a training
worker shards the experts on meta, then `materialize` allocates what it kept and initialises each
tensor once. Initial values are drawn per tensor (per expert for routed experts) from a generator
seeded by (seed, tensor name[, expert id]), so expert e starts the same whichever rank holds it.

Shapes: B batch, T tokens, D model dim, V vocab.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from raymoe.models.attention import build_attention
from raymoe.models.config import ModelConfig
from raymoe.models.kv_cache import CacheView, KVCache
from raymoe.models.moe import FeedForward, GroupedExperts, MoE, Router
from raymoe.models.norm import RMSNorm
from raymoe.models.rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg.dim, cfg.moe) if cfg.is_moe_layer(layer_id) else FeedForward(cfg.dim, cfg.dense_hidden_dim)

    def forward(self, x_BTD, rope, cache: CacheView | None):
        return self.feed_forward(self.attend(x_BTD, rope, cache))

    def attend(self, x_BTD, rope, cache: CacheView | None):
        """The attention half (with its residual): mixes positions, so it runs per sequence batch."""
        return x_BTD + self.attn(self.attn_norm(x_BTD), rope, cache)

    def feed_forward(self, x):
        """The FFN half (with its residual): per token, so any leading shape (`forward_jobs`)."""
        return x + self.ffn(self.ffn_norm(x))


class MoETransformer(nn.Module):
    """Decoder-only MoE language model; `forward` returns float32 logits (B, T, V)."""

    hf_architecture: str | None = None  # the Hugging Face architecture load_hf read it as

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.rope, cfg.rope_head_dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if not self.embed.weight.is_meta:
            self.init_weights()

    def materialize(self, device: torch.device | str, seed: int | None = None, *, init: bool = True) -> MoETransformer:
        """Allocates a meta-built (and possibly expert-sharded) model on `device`.

        Only the tensors the model holds are allocated. With `init` each is initialised once
        (`init_weights(seed)`); without, only derived buffers are set and the caller loads the
        weights (every parameter must then be loaded).
        """
        self.to_empty(device=device)
        if init:
            self.init_weights(seed=seed)
        else:
            self._reset_buffers()
        return self

    @torch.no_grad()
    def _reset_buffers(self) -> None:
        """Buffers that are derived (rope tables) or start at zero (balance bias)."""
        self.rope.inv_freq.copy_(_rope_inv_freq(self.cfg))
        for moe in self.moe_layers():
            moe.router.bias_E.zero_()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for every matrix, ones for norms, zeros for biases and balance bias.

        Each tensor (each routed expert) draws from its own generator seeded by (seed, name[,
        expert id]), so values do not depend on which experts this process holds or on the
        order modules are visited. `seed=None` takes the seed from torch's global RNG.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.long))
        std = self.cfg.init_std

        def normal_(target: torch.Tensor, key: str) -> None:
            generator = torch.Generator().manual_seed(_tensor_seed(seed, key))
            target.copy_(torch.randn(target.shape, generator=generator) * std)

        self._reset_buffers()
        done: set[int] = set()
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if id(module.weight) not in done:  # tied LM head: the embedding drew it
                    normal_(module.weight, f"{name}.weight")
                    done.add(id(module.weight))
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.zero_()
            elif isinstance(module, GroupedExperts):
                for param_name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
                    stacked = getattr(module, param_name)
                    for local, expert in enumerate(module.expert_ids):
                        normal_(stacked[local], f"{name}.{param_name}.{expert}")
            elif isinstance(module, Router):
                normal_(module.weight, f"{name}.weight")
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        positions_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slot_ids_B: torch.Tensor | None = None,
        count_mask_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every input position.

        Args:
            input_ids_BT: token ids (B, T).
            positions_BT: absolute positions; default arange(T) for every row.
            cache: a KVCache; when given, keys/values are written at `positions_BT` in the rows
                `slot_ids_B` and each query attends to its slot's keys at positions <= its own.
            slot_ids_B: cache rows, one per sequence; default arange(B).
            count_mask_BT: bool, the real tokens; False marks right padding, which is neither
                counted in the MoE layers' tokens-per-expert statistics nor sent to an expert
                (its outputs are then meaningless); default all.

        Returns:
            float32 logits (B, T, V).
        """
        return self.lm_head(self.hidden_states(input_ids_BT, positions_BT, cache, slot_ids_B, count_mask_BT)).float()

    def hidden_states(
        self,
        input_ids_BT: torch.Tensor,
        positions_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slot_ids_B: torch.Tensor | None = None,
        count_mask_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final normed hidden states (B, T, D), the LM head's input (same args as forward).

        Fine-tuning applies the LM head only where a target carries loss (a few answer tokens
        per example), which saves most of the head's cost.
        """
        B, T = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(T, device=input_ids_BT.device).expand(B, T)
        view = None
        if cache is not None:
            if slot_ids_B is None:
                slot_ids_B = torch.arange(B, device=input_ids_BT.device)
            view = cache.view(slot_ids_B, positions_BT)
        rope = self.rope(positions_BT)
        h_BTD = self.embed(input_ids_BT)
        moe_layers: list[MoE] = []
        if count_mask_BT is not None:
            moe_layers = list(self.moe_layers())
            for moe in moe_layers:
                moe.count_mask_T = count_mask_BT.reshape(-1)
        try:
            for layer in self.layers:
                h_BTD = layer(h_BTD, rope, view)
        finally:
            for moe in moe_layers:
                moe.count_mask_T = None
        return self.norm(h_BTD)

    def moe_layers(self) -> Iterator[MoE]:
        for layer in self.layers:
            if isinstance(layer.ffn, MoE):
                yield layer.ffn

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' balance and z-loss terms from the last forward pass."""
        return sum((moe.last_aux_loss for moe in self.moe_layers()), torch.zeros(()))

    def tokens_per_expert(self) -> torch.Tensor:
        """(num_moe_layers, E) routed-token counts from the last forward pass."""
        return torch.stack([moe.last_tokens_per_expert_E for moe in self.moe_layers()])

    def num_params(self, active: bool = False) -> int:
        """Parameter count; `active=True` counts only the top-k routed experts per token."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for moe in self.moe_layers():
            experts = moe.experts
            per_expert = sum(p[0].numel() for p in (experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF))
            total -= per_expert * (len(moe.experts.expert_ids) - moe.cfg.num_experts_per_tok)
        return total


def _tensor_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed for tensor `key` of a model initialised with `seed`."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    with torch.device("cpu"):
        return RotaryEmbedding(cfg.rope, cfg.rope_head_dim).inv_freq
