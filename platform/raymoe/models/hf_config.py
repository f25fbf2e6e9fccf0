"""Hugging Face config.json <-> ModelConfig, for Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3.

Field meanings follow transformers' MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig and
DeepseekV3Config (v5: `rope_parameters`; older files: `rope_theta` + `rope_scaling`, both read).
"""

from __future__ import annotations

from typing import Any

from raymoe.models.config import ModelConfig, MoEConfig, RopeConfig

ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read: unsupported architecture, missing tensor, wrong shape."""


def _rope_from_hf(hf: dict[str, Any], interleaved: bool) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = {**legacy, **params}
    if kind in ("default", None):
        return RopeConfig(theta=float(theta), interleaved=interleaved)
    if kind != "yarn":
        raise CheckpointError(f"rope type {kind!r} is not supported (supported: default, yarn)")
    return RopeConfig(
        theta=float(theta),
        scaling="yarn",
        factor=float(scaling["factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        beta_fast=float(scaling.get("beta_fast") or 32.0),
        beta_slow=float(scaling.get("beta_slow") or 1.0),
        mscale=float(scaling.get("mscale") or 0.0),
        mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
        interleaved=interleaved,
    )


def _sparse_step_dense_ids(hf: dict[str, Any]) -> list[int]:
    """Qwen-MoE: a layer is dense if listed in mlp_only_layers or off the decoder_sparse_step grid."""
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    dense |= {i for i in range(hf["num_hidden_layers"]) if (i + 1) % step != 0}
    return sorted(dense)


def config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, str]:
    """Returns (ModelConfig, architecture name) for a transformers config.json mapping."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(
            f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {sorted(ARCHITECTURES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("use_sliding_window") or (arch == "MixtralForCausalLM" and hf.get("sliding_window")):
        raise CheckpointError(f"sliding-window attention ({hf.get('sliding_window')}) is not supported")
    common = dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )
    num_experts = hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts")
    if not num_experts:
        raise CheckpointError(f"{arch} config has no expert count (num_local_experts, num_experts or n_routed_experts)")
    if arch == "MixtralForCausalLM":
        cfg = ModelConfig(
            **common,
            head_dim=hf.get("head_dim") or 0,
            rope=_rope_from_hf(hf, False),
            moe=MoEConfig(
                num_experts=num_experts,
                num_experts_per_tok=hf["num_experts_per_tok"],
                expert_hidden_dim=hf["intermediate_size"],
                norm_topk_prob=True,
            ),
        )
    elif arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        qwen3 = arch == "Qwen3MoeForCausalLM"
        if qwen3 and hf.get("attention_bias"):
            raise CheckpointError("Qwen3-MoE with attention_bias=true is not supported")
        cfg = ModelConfig(
            **common,
            head_dim=hf.get("head_dim") or 0,
            rope=_rope_from_hf(hf, False),
            qkv_bias=not qwen3 and hf.get("qkv_bias", True),
            qk_norm=qwen3,
            dense_hidden_dim=hf.get("intermediate_size", 0),
            dense_layer_ids=_sparse_step_dense_ids(hf),
            moe=MoEConfig(
                num_experts=num_experts,
                num_experts_per_tok=hf["num_experts_per_tok"],
                expert_hidden_dim=hf["moe_intermediate_size"],
                norm_topk_prob=bool(hf.get("norm_topk_prob")),
                num_shared_experts=0 if qwen3 else 1,
                shared_hidden_dim=0 if qwen3 else hf["shared_expert_intermediate_size"],
                shared_expert_gate=not qwen3,
            ),
        )
    else:
        if hf.get("attention_bias"):
            raise CheckpointError("DeepSeek-V3 with attention_bias=true is not supported")
        n_shared = hf.get("n_shared_experts") or 0
        cfg = ModelConfig(
            **common,
            attention="mla",
            q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            rope=_rope_from_hf(hf, bool(hf.get("rope_interleave", True))),
            dense_hidden_dim=hf["intermediate_size"],
            first_k_dense=hf.get("first_k_dense_replace", 0),
            moe=MoEConfig(
                num_experts=num_experts,
                num_experts_per_tok=hf["num_experts_per_tok"],
                expert_hidden_dim=hf["moe_intermediate_size"],
                num_shared_experts=n_shared,
                shared_hidden_dim=n_shared * hf["moe_intermediate_size"],
                score_func="sigmoid",
                num_groups=hf.get("n_group") or 1,
                topk_groups=hf.get("topk_group") or 1,
                norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                balance_bias=True,
            ),
        )
    return cfg, arch


def hf_architecture_for(cfg: ModelConfig) -> str:
    """The transformers architecture that computes exactly what `cfg` computes, or an error why none does."""
    moe = cfg.moe
    if cfg.attention == "mla":
        problems = []
        if moe.score_func != "sigmoid":
            problems.append(f"moe.score_func={moe.score_func!r} (DeepseekV3 routes with sigmoid)")
        if cfg.dense_layer_ids:
            problems.append(f"dense_layer_ids={cfg.dense_layer_ids} (DeepseekV3 has first_k_dense only)")
        if moe.shared_hidden_dim != moe.num_shared_experts * moe.expert_hidden_dim or moe.shared_expert_gate:
            problems.append("shared experts not of width num_shared_experts * expert_hidden_dim, or gated")
        if moe.capacity_factor is not None:
            problems.append("moe.capacity_factor (transformers is dropless)")
        if problems:
            raise CheckpointError("no Hugging Face architecture matches this config: " + "; ".join(problems))
        return "DeepseekV3ForCausalLM"
    base_ok = (
        moe.score_func == "softmax"
        and moe.num_groups == 1
        and moe.routed_scaling_factor == 1.0
        and not moe.balance_bias
        and moe.capacity_factor is None
        and cfg.rope.scaling == "none"
        and not cfg.rope.interleaved
        and cfg.first_k_dense == 0
    )
    if base_ok and moe.shared_expert_gate and cfg.qkv_bias and not cfg.qk_norm:
        return "Qwen2MoeForCausalLM"
    if base_ok and not moe.shared_hidden_dim and not cfg.qkv_bias and not cfg.dense_layer_ids:
        if cfg.qk_norm:
            return "Qwen3MoeForCausalLM"
        if moe.norm_topk_prob:
            return "MixtralForCausalLM"
    raise CheckpointError(
        "no Hugging Face architecture matches this GQA config (Mixtral: softmax top-k, no shared experts; "
        "Qwen2-MoE: gated shared expert + qkv bias; Qwen3-MoE: qk_norm); use attention=mla for DeepSeek-V3"
    )


def config_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    """The config.json mapping transformers reads for `arch`."""
    moe = cfg.moe
    hf: dict[str, Any] = dict(
        architectures=[arch],
        model_type=ARCHITECTURES[arch],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        initializer_range=cfg.init_std,
        num_experts_per_tok=moe.num_experts_per_tok,
        dtype="float32",
    )
    rope: dict[str, Any] = {"rope_theta": cfg.rope.theta, "rope_type": "default"}
    if cfg.rope.scaling == "yarn":
        r = cfg.rope
        rope.update(
            rope_type="yarn",
            factor=r.factor,
            original_max_position_embeddings=r.original_max_position_embeddings,
            beta_fast=r.beta_fast,
            beta_slow=r.beta_slow,
            mscale=r.mscale,
            mscale_all_dim=r.mscale_all_dim,
        )
    hf["rope_parameters"] = rope
    if arch == "MixtralForCausalLM":
        hf.update(
            num_local_experts=moe.num_experts,
            intermediate_size=moe.expert_hidden_dim,
            head_dim=cfg.head_dim,
            sliding_window=None,
        )
    elif arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        hf.update(
            num_experts=moe.num_experts,
            moe_intermediate_size=moe.expert_hidden_dim,
            intermediate_size=cfg.dense_hidden_dim or moe.expert_hidden_dim,
            norm_topk_prob=moe.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=list(cfg.dense_layer_ids),
            head_dim=cfg.head_dim,
            use_sliding_window=False,
        )
        if arch == "Qwen2MoeForCausalLM":
            hf.update(shared_expert_intermediate_size=moe.shared_hidden_dim, qkv_bias=True)
        else:
            hf.update(attention_bias=False)
    else:
        hf.update(
            n_routed_experts=moe.num_experts,
            moe_intermediate_size=moe.expert_hidden_dim,
            n_shared_experts=moe.num_shared_experts,
            intermediate_size=cfg.dense_hidden_dim or moe.expert_hidden_dim,
            first_k_dense_replace=cfg.first_k_dense,
            n_group=moe.num_groups,
            topk_group=moe.topk_groups,
            norm_topk_prob=moe.norm_topk_prob,
            routed_scaling_factor=moe.routed_scaling_factor,
            q_lora_rank=cfg.q_lora_rank or None,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            rope_interleave=cfg.rope.interleaved,
            attention_bias=False,
            num_nextn_predict_layers=0,
        )
    return hf
