"""Parameter counts from a config alone (no weights allocated), for published shapes too."""

from __future__ import annotations

from raymoe.models.config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    if cfg.attention == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            q = cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * cfg.num_heads * qk
        else:
            q = cfg.dim * cfg.num_heads * qk
        kv = cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
        kv += cfg.kv_lora_rank * cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        return q + kv + cfg.num_heads * cfg.v_head_dim * cfg.dim
    q_out = cfg.num_heads * cfg.head_dim
    kv_out = cfg.num_kv_heads * cfg.head_dim
    params = cfg.dim * (q_out + 2 * kv_out) + q_out * cfg.dim
    if cfg.qkv_bias:
        params += q_out + 2 * kv_out
    if cfg.qk_norm:
        params += 2 * cfg.head_dim
    return params


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters; active counts top-k routed experts + shared ones."""
    moe = cfg.moe
    embed = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) + cfg.dim
    per_layer = attention_params(cfg) + 2 * cfg.dim
    expert = 3 * cfg.dim * moe.expert_hidden_dim
    shared = 3 * cfg.dim * moe.shared_hidden_dim + (cfg.dim if moe.shared_expert_gate else 0)
    total = active = embed
    for layer in range(cfg.num_layers):
        total += per_layer
        active += per_layer
        if cfg.is_moe_layer(layer):
            router = moe.num_experts * cfg.dim
            total += moe.num_experts * expert + shared + router
            active += moe.num_experts_per_tok * expert + shared + router
        else:
            dense = 3 * cfg.dim * cfg.dense_hidden_dim
            total += dense
            active += dense
    return total, active
