"""Model configuration and named flavours.

Shapes of the published models follow their Hugging Face config.json files:
Mixtral-8x7B (mistralai), Qwen3-30B-A3B (Qwen), DeepSeek-V2-Lite and DeepSeek-V3 (deepseek-ai).
Only `debug` and `small` are meant to be instantiated on a CPU; the others feed capacity planning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from raymoe.models.config_checks import require


@dataclass(kw_only=True)
class RopeConfig:
    """Rotary embedding; `scaling="yarn"` is the long-context variant DeepSeek-V3 ships with."""

    theta: float = 10000.0
    scaling: Literal["none", "yarn"] = "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # Mixtral/Qwen rotate the two halves of a head; DeepSeek-V3 stores rope dims interleaved
    # (x0,y0,x1,y1,...) and de-interleaves before rotating.
    interleaved: bool = False


@dataclass(kw_only=True)
class MoEConfig:
    """Routed + shared experts of one MoE layer (all MoE layers of a model share it)."""

    num_experts: int
    num_experts_per_tok: int
    expert_hidden_dim: int
    num_shared_experts: int = 0
    shared_hidden_dim: int = 0  # total hidden size of the shared expert(s); 0 = none
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared expert output
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    num_groups: int = 1  # group-limited routing (DeepSeek-V3): experts split in groups
    topk_groups: int = 1  # ... and tokens pick experts only from their best groups
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to scores for selection only,
    # nudged by `bias_update_rate * sign(mean_load - load)` after each step.
    balance_bias: bool = False
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    # None = dropless. Otherwise each expert takes at most ceil(factor * T * K / E) tokens.
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        require(self.num_experts > 0, f"moe.num_experts must be > 0, got {self.num_experts}")
        require(
            0 < self.num_experts_per_tok <= self.num_experts,
            f"moe.num_experts_per_tok must be in 1..{self.num_experts}, got {self.num_experts_per_tok}",
        )
        require(
            self.num_experts % self.num_groups == 0,
            f"moe.num_groups={self.num_groups} must divide moe.num_experts={self.num_experts}",
        )
        require(
            1 <= self.topk_groups <= self.num_groups,
            f"moe.topk_groups must be in 1..{self.num_groups}, got {self.topk_groups}",
        )
        per_group = self.num_experts // self.num_groups
        require(
            self.num_experts_per_tok <= self.topk_groups * per_group,
            f"moe.num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in "
            f"moe.topk_groups={self.topk_groups} groups of {per_group}",
        )
        if self.num_shared_experts and not self.shared_hidden_dim:
            self.shared_hidden_dim = self.num_shared_experts * self.expert_hidden_dim


@dataclass(kw_only=True)
class ModelConfig:
    """A decoder-only MoE transformer. Dims: D=dim, H=num_heads, F=expert_hidden_dim."""

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int = 0  # 0 = num_heads (multi-head attention)
    head_dim: int = 0  # 0 = dim // num_heads
    attention: Literal["gqa", "mla"] = "gqa"
    qkv_bias: bool = False  # Qwen2-MoE
    qk_norm: bool = False  # Qwen3-MoE: RMSNorm over each q and k head
    # MLA (DeepSeek-V2/V3). q_lora_rank 0 = queries projected directly.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    dense_hidden_dim: int = 0  # FFN width of dense (non-MoE) layers
    first_k_dense: int = 0  # DeepSeek: the first k layers use a dense FFN
    dense_layer_ids: list[int] = field(default_factory=list)  # Qwen2-MoE mlp_only_layers
    moe: MoEConfig
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not self.num_kv_heads:
            self.num_kv_heads = self.num_heads
        if not self.head_dim:
            self.head_dim = self.dim // self.num_heads
        require(
            self.num_heads % self.num_kv_heads == 0,
            f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}",
        )
        if self.attention == "mla":
            require(
                self.kv_lora_rank > 0 and self.qk_rope_head_dim > 0 and self.v_head_dim > 0,
                "attention=mla needs kv_lora_rank, qk_rope_head_dim and v_head_dim > 0, got "
                f"{self.kv_lora_rank}, {self.qk_rope_head_dim}, {self.v_head_dim}",
            )
            require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
        else:
            require(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.first_k_dense or self.dense_layer_ids:
            require(self.dense_hidden_dim > 0, "dense layers need dense_hidden_dim > 0")

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense and layer_id not in self.dense_layer_ids

    @property
    def rope_head_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _flavours() -> dict[str, ModelConfig]:
    return {
        # DeepSeek-V3 in miniature: a CPU step in well under a second; exercises MLA with low-rank
        # queries, shared experts, a dense first layer, group-limited sigmoid routing + balance bias.
        "debug": ModelConfig(
            vocab_size=2048,
            dim=128,
            num_layers=4,
            num_heads=4,
            attention="mla",
            q_lora_rank=64,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            max_seq_len=256,
            dense_hidden_dim=256,
            first_k_dense=1,
            rope=RopeConfig(interleaved=True),
            moe=MoEConfig(
                num_experts=8,
                num_experts_per_tok=2,
                expert_hidden_dim=128,
                num_shared_experts=1,
                score_func="sigmoid",
                num_groups=2,
                topk_groups=1,
                balance_bias=True,
                routed_scaling_factor=1.0,
            ),
        ),
        "small": ModelConfig(
            vocab_size=8192,
            dim=512,
            num_layers=8,
            num_heads=8,
            attention="mla",
            kv_lora_rank=128,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            max_seq_len=1024,
            dense_hidden_dim=1536,
            first_k_dense=1,
            rope=RopeConfig(interleaved=True),
            moe=MoEConfig(
                num_experts=16,
                num_experts_per_tok=2,
                expert_hidden_dim=512,
                num_shared_experts=1,
                score_func="sigmoid",
                num_groups=4,
                topk_groups=2,
                balance_bias=True,
            ),
        ),
        "mixtral-8x7b": ModelConfig(
            vocab_size=32000,
            dim=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            max_seq_len=32768,
            norm_eps=1e-5,
            rope=RopeConfig(theta=1e6),
            moe=MoEConfig(num_experts=8, num_experts_per_tok=2, expert_hidden_dim=14336),
        ),
        "qwen3-30b-a3b": ModelConfig(
            vocab_size=151936,
            dim=2048,
            num_layers=48,
            num_heads=32,
            num_kv_heads=4,
            head_dim=128,
            qk_norm=True,
            max_seq_len=40960,
            rope=RopeConfig(theta=1e6),
            moe=MoEConfig(num_experts=128, num_experts_per_tok=8, expert_hidden_dim=768),
        ),
        "deepseek-v2-lite": ModelConfig(
            vocab_size=102400,
            dim=2048,
            num_layers=27,
            num_heads=16,
            attention="mla",
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            max_seq_len=163840,
            dense_hidden_dim=10944,
            first_k_dense=1,
            rope=RopeConfig(
                scaling="yarn",
                factor=40,
                original_max_position_embeddings=4096,
                mscale=0.707,
                mscale_all_dim=0.707,
                interleaved=True,
            ),
            moe=MoEConfig(
                num_experts=64,
                num_experts_per_tok=6,
                expert_hidden_dim=1408,
                num_shared_experts=2,
                norm_topk_prob=False,
            ),
        ),
        "deepseek-v3": ModelConfig(
            vocab_size=129280,
            dim=7168,
            num_layers=61,
            num_heads=128,
            attention="mla",
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            max_seq_len=163840,
            dense_hidden_dim=18432,
            first_k_dense=3,
            rope=RopeConfig(
                scaling="yarn",
                factor=40,
                original_max_position_embeddings=4096,
                mscale=1.0,
                mscale_all_dim=1.0,
                interleaved=True,
            ),
            moe=MoEConfig(
                num_experts=256,
                num_experts_per_tok=8,
                expert_hidden_dim=2048,
                num_shared_experts=1,
                score_func="sigmoid",
                num_groups=8,
                topk_groups=4,
                routed_scaling_factor=2.5,
                balance_bias=True,
            ),
        ),
    }


FLAVOURS: tuple[str, ...] = tuple(_flavours())


def flavour(name: str) -> ModelConfig:
    """Returns a fresh ModelConfig for a named flavour (see FLAVOURS)."""
    flavours = _flavours()
    if name not in flavours:
        raise ValueError(f"unknown model flavour {name!r}; known: {list(flavours)}")
    return flavours[name]
