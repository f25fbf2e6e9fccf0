"""The one place that maps native parameter names to Hugging Face names and back.

Three namespaces:
- native: the module's state dict; experts stacked per layer (`layers.{i}.ffn.experts.w_gate_EFD`,
  shape (L, F, D), L = the experts this process holds);
- Hugging Face: one tensor per expert (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`,
  Mixtral: `block_sparse_moe.experts.{e}.w1.weight`);
- sharded: what training checkpoints store. It is the Hugging Face name of each tensor (so a shard
  written at one expert-parallel layout loads at any other, and export is a copy), plus state HF
  files do not carry: the router's balance bias for every architecture (`training_state=True`)
  and AdamW moments under `optim.<slot>.<name>`.
`held_tensors` lists what a (possibly expert-sharded) model holds under those names; saving,
loading, training checkpoints and export all walk that list.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
    fixed = {
        "embed.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
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


@dataclass(frozen=True)
class HeldTensor:
    """One tensor a model holds, by its Hugging Face / sharded name.

    `native` is the state-dict entry it lives in; for a routed expert, `local` is its index in
    the stacked parameter and `expert` its global id.
    """

    key: str
    native: str
    expert: int | None = None
    local: int | None = None

    def view(self, source: torch.Tensor) -> torch.Tensor:
        """This tensor inside `source` (the native entry, or an optimizer state shaped like it)."""
        return source if self.local is None else source[self.local]


def held_tensors(model: MoETransformer, arch: str, *, training_state: bool = False) -> list[HeldTensor]:
    """Every tensor `model` holds under its Hugging Face name: dense entries first, then experts.

    Args:
        model: a model, possibly holding only some experts (it may be on the meta device).
        arch: Hugging Face architecture the names follow.
        training_state: also list buffers HF files of `arch` leave out (the router's balance
            bias), as training checkpoints must.
    """
    out: list[HeldTensor] = []
    for name in model.state_dict(keep_vars=True):
        if ".experts.w_" in name or (not training_state and _skipped_buffer(arch, name)):
            continue
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        out.append(HeldTensor(native_key_to_hf(name, arch), name))
    for layer_id, layer in enumerate(model.layers):
        if isinstance(layer.ffn, MoE):
            experts = layer.ffn.experts
            for param in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
                native = f"layers.{layer_id}.ffn.experts.{param}"
                for local, expert in enumerate(experts.expert_ids):
                    out.append(HeldTensor(expert_key(arch, layer_id, expert, param), native, expert, local))
    return out


def optimizer_key(slot: str, key: str) -> str:
    """Sharded name of optimizer state `slot` (AdamW: exp_avg, exp_avg_sq, step) of tensor `key`."""
    return f"optim.{slot}.{key}"


def native_to_hf(model: MoETransformer, arch: str) -> dict[str, torch.Tensor]:
    """HF-named tensors of `model` (only the experts it holds, one tensor per expert)."""
    state = model.state_dict()
    return {h.key: h.view(state[h.native]) for h in held_tensors(model, arch)}


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


def load_hf_state(
    model: MoETransformer,
    arch: str,
    tensors: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
    available: set[str],
) -> None:
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
        state = model.state_dict(keep_vars=True)
        for held in held_tensors(model, arch):
            _copy_checked(held.view(state[held.native].data), fetch(held.key), held.key)
            used.add(held.key)
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
