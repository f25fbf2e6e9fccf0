"""The one place that maps native parameter names to Hugging Face names and back.

Native experts are stacked per layer (`layers.{i}.ffn.experts.w_gate_EFD`, shape (L, F, D)); HF
checkpoints hold one tensor per expert (`...experts.{e}.gate_proj.weight`, Mixtral: w1/w3/w2).
Per-expert HF names are also what sharded training checkpoints use, so a shard written at one
expert-parallel layout can be loaded at any other: `native_to_hf` only emits the experts a
(possibly sharded) model holds, and `load_experts` reads just the ones it needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from raymoe.models.hf_config import CheckpointError
from raymoe.models.moe import GroupedExperts, MoE
from raymoe.models.transformer import MoETransformer

_EXPERT_NAMES = {
    "MixtralForCausalLM": {"w_gate_EFD": "w1", "w_up_EFD": "w3", "w_down_EDF": "w2"},
    "default": {"w_gate_EFD": "gate_proj", "w_up_EFD": "up_proj", "w_down_EDF": "down_proj"},
}
_SHARED = {"Qwen2MoeForCausalLM": "shared_expert", "DeepseekV3ForCausalLM": "shared_experts"}


def _moe_prefix(arch: str) -> str:
    return "block_sparse_moe" if arch == "MixtralForCausalLM" else "mlp"


def native_key_to_hf(name: str, arch: str) -> str:
    """HF name of a native non-expert parameter or buffer (e.g. `layers.0.attn.q_proj.weight`)."""
    fixed = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not m:
        raise KeyError(f"no Hugging Face name for native key {name!r}")
    i, rest = m.groups()
    moe = _moe_prefix(arch)
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"attn_norm\.weight", lambda _: "input_layernorm.weight"),
        (r"ffn_norm\.weight", lambda _: "post_attention_layernorm.weight"),
        (r"attn\.(.+)", lambda g: f"self_attn.{g[1]}"),
        (r"ffn\.router\.weight", lambda _: f"{moe}.gate.weight"),
        (r"ffn\.router\.bias_E", lambda _: f"{moe}.gate.e_score_correction_bias"),
        (r"ffn\.shared_experts\.(.+)", lambda g: f"mlp.{_SHARED.get(arch, 'shared_experts')}.{g[1]}"),
        (r"ffn\.shared_expert_gate\.weight", lambda _: "mlp.shared_expert_gate.weight"),
        (r"ffn\.((gate|up|down)_proj\.weight)", lambda g: f"mlp.{g[1]}"),
    ]
    for pattern, to_hf in rules:
        g = re.fullmatch(pattern, rest)
        if g:
            return f"model.layers.{i}.{to_hf(g)}"
    raise KeyError(f"no Hugging Face name for native key {name!r}")


def expert_key(arch: str, layer: int, expert: int, native_param: str) -> str:
    """HF name of one expert's matrix, e.g. `model.layers.1.mlp.experts.3.gate_proj.weight`."""
    names = _EXPERT_NAMES.get(arch, _EXPERT_NAMES["default"])
    return f"model.layers.{layer}.{_moe_prefix(arch)}.experts.{expert}.{names[native_param]}.weight"


def _skipped_buffer(arch: str, name: str) -> bool:
    # Only DeepSeek-V3 checkpoints carry the balance bias; other architectures route without one.
    return name.endswith("router.bias_E") and arch != "DeepseekV3ForCausalLM"


def native_to_hf(model: MoETransformer, arch: str) -> dict[str, torch.Tensor]:
    """HF-named tensors of `model` (only the experts it holds, one tensor per expert)."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for name, tensor in state.items():
        if ".experts.w_" in name or _skipped_buffer(arch, name):
            continue
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        out[native_key_to_hf(name, arch)] = tensor
    for layer_id, layer in enumerate(model.layers):
        if isinstance(layer.ffn, MoE):
            experts = layer.ffn.experts
            for param in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
                stacked = getattr(experts, param).detach()
                for local, expert in enumerate(experts.expert_ids):
                    out[expert_key(arch, layer_id, expert, param)] = stacked[local]
    return out


def load_experts(experts: GroupedExperts, layer_id: int, arch: str, get: Callable[[str], torch.Tensor]) -> set[str]:
    """Fills `experts` (whatever ids it holds) from per-expert tensors; returns the keys read."""
    used = set()
    with torch.no_grad():
        for param in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
            target = getattr(experts, param)
            for local, expert in enumerate(experts.expert_ids):
                key = expert_key(arch, layer_id, expert, param)
                _copy_checked(target[local], get(key), key)
                used.add(key)
    return used


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointError(f"tensor {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))


def load_hf_state(model: MoETransformer, arch: str, tensors: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
                  available: set[str]) -> None:
    """Copies HF-named tensors into `model`, checking that each one exists and has the right shape.

    Args:
        model: the (possibly expert-sharded) model to fill.
        arch: HF architecture name the tensors are named for.
        tensors: a mapping or a getter `name -> tensor` (lazy reads from safetensors files).
        available: every tensor name in the checkpoint (to report missing and unexpected keys).
    """
    get = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
    used: set[str] = set()

    def fetch(key: str) -> torch.Tensor:
        if key not in available:
            raise CheckpointError(f"checkpoint is missing tensor {key!r}")
        return get(key)

    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if ".experts.w_" in name or _skipped_buffer(arch, name):
                continue
            if name == "lm_head.weight" and model.cfg.tie_embeddings:
                continue
            key = native_key_to_hf(name, arch)
            _copy_checked(target.data, fetch(key), key)
            used.add(key)
        for layer_id, layer in enumerate(model.layers):
            if isinstance(layer.ffn, MoE):
                used |= load_experts(layer.ffn.experts, layer_id, arch, fetch)
    unexpected = {k for k in available - used if not _ignorable(k, model)}
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected tensors, e.g. {sorted(unexpected)[:3]}")


def _ignorable(key: str, model: MoETransformer) -> bool:
    """Keys a checkpoint may carry that this model does not use."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    m = re.match(r"model\.layers\.(\d+)\.", key)
    # DeepSeek-V3 ships a multi-token-prediction layer after the last decoder layer.
    if m and int(m.group(1)) >= model.cfg.num_layers:
        return True
    # An expert-sharded model reads only its own experts.
    sharded = any(len(moe.experts.expert_ids) < moe.cfg.num_experts for moe in model.moe_layers())
    return sharded and re.search(r"\.experts\.\d+\.", key) is not None
