"""LoRA adapters on the model's `nn.Linear` layers, several at once, chosen per batch row.

LoRA (Hu et al. 2021): a frozen weight W gets a low-rank update, y = x W^T + s * (x A^T) B^T with
A (r, in), B (out, r) and s = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA). Adapters are
read and written in Hugging Face peft's format (`adapter_config.json`, `adapter_model.safetensors`
with keys `base_model.model.<HF module>.lora_A.weight`), names mapped by the state-dict adapter.
Several adapters stay loaded; a shared `LoRAContext` says which one each batch row uses (as in
Punica / S-LoRA multi-adapter serving), so requests for different adapters share one batch.
Training (`add_trainable_lora`) wraps the targets with one adapter that every row uses, freezes
the base, and can also give each routed expert its own pair (`raymoe.models.expert_lora`);
`lora_state` / `set_lora_state` move an adapter as peft-named tensors (federated rounds, saving).

Shapes: B batch rows, T tokens, I in features, O out features, R rank.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from raymoe.atomic_io import atomic_write
from raymoe.models.config_checks import require
from raymoe.models.expert_lora import EXPERT_PROJECTIONS, LoRAGroupedExperts, init_lora_pair
from raymoe.models.lora_merge import read_adapter
from raymoe.models.moe import GroupedExperts, MoE
from raymoe.models.state_dict_adapter import expert_key, native_key_to_hf

if TYPE_CHECKING:
    from raymoe.models.transformer import MoETransformer

PEFT_PREFIX = "base_model.model."
# The adapter name used while training (one adapter, every row).
TRAIN_ADAPTER = "default"
# `lora.attention_modules` entry meaning every projection of the model's attention.
ALL_ATTENTION = "all"


@dataclass
class LoRAContext:
    """Which adapter each row of the next forward uses (None = base weights), shared by all layers.

    `active` applies one adapter to every row (training); `row_adapters` picks per row (serving).
    """

    row_adapters: list[str | None] | None = None
    names: set[str] = field(default_factory=set)  # adapters loaded
    active: str | None = None


@dataclass(kw_only=True)
class LoRAConfig:
    """Which layers get a trainable low-rank update, and its size (peft's LoraConfig fields)."""

    # r: rank of each update; alpha: scaling numerator (scaling = alpha / r, peft's default rule).
    rank: int = 8
    alpha: float = 16.0
    # Attention projections to adapt, by name: `all` (every projection of the model's attention),
    # or names from GQA's q_proj k_proj v_proj o_proj / MLA's q_proj (or q_a_proj, q_b_proj),
    # kv_a_proj_with_mqa, kv_b_proj, o_proj.
    attention_modules: list[str] = field(default_factory=lambda: ["all"])
    # Also adapt the shared experts' gate/up/down projections.
    shared_experts: bool = False
    # Also give every routed expert its own pair on gate/up/down (held by the expert's shard).
    routed_experts: bool = False

    def __post_init__(self) -> None:
        require(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        require(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        require(
            bool(self.attention_modules or self.shared_experts or self.routed_experts),
            "lora: no target (lora.attention_modules is empty and lora.shared_experts and "
            "lora.routed_experts are false)",
        )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """An `nn.Linear` (kept as `base`, frozen) plus any number of named low-rank updates."""

    def __init__(self, base: nn.Module, context: LoRAContext):
        super().__init__()
        self.base = base
        self.context = context
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, a_RI: torch.Tensor, b_OR: torch.Tensor, scaling: float) -> None:
        out_f, in_f = self.base.out_features, self.base.in_features
        if a_RI.shape[1] != in_f or b_OR.shape[0] != out_f or a_RI.shape[0] != b_OR.shape[1]:
            raise ValueError(
                f"adapter {name!r}: lora_A {tuple(a_RI.shape)} / lora_B {tuple(b_OR.shape)} do not fit a "
                f"Linear({in_f} -> {out_f})"
            )
        self.lora_A[name] = nn.Parameter(a_RI.float().clone())
        self.lora_B[name] = nn.Parameter(b_OR.float().clone())
        self.scaling[name] = float(scaling)

    def forward(self, x_BTI: torch.Tensor) -> torch.Tensor:
        y = self.base(x_BTI)
        rows = self.context.row_adapters
        active = self.context.active
        if not rows and active is not None and active in self.lora_A:
            return y + (x_BTI @ self.lora_A[active].T) @ self.lora_B[active].T * self.scaling[active]
        if not rows:
            return y
        if len(rows) != x_BTI.shape[0]:
            raise ValueError(f"LoRA context names {len(rows)} rows, the batch has {x_BTI.shape[0]}")
        for name in {r for r in rows if r is not None}:
            if name not in self.lora_A:
                continue  # this layer is not a target of that adapter
            delta = (x_BTI @ self.lora_A[name].T) @ self.lora_B[name].T * self.scaling[name]
            if all(r == name for r in rows):
                y = y + delta
            else:
                mask_B = torch.tensor([r == name for r in rows], device=y.device)
                y = y + delta * mask_B.view(-1, *([1] * (y.dim() - 1)))
        return y


def _hf_module_names(model: nn.Module, arch: str) -> dict[str, str]:
    """HF module name -> native module name for every Linear-like layer that has one."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) or not hasattr(module, "in_features"):
            continue
        native = name[: -len(".base")] if name.endswith(".base") else name
        try:
            names[native_key_to_hf(native + ".weight", arch)[: -len(".weight")]] = native
        except KeyError:
            continue
    return names


def _architecture(model: MoETransformer) -> str:
    from raymoe.models.hf_config import hf_architecture_for

    return getattr(model, "hf_architecture", None) or hf_architecture_for(model.cfg)


def lora_context(model: nn.Module) -> LoRAContext:
    """The model's shared LoRA context (created on first use)."""
    context: LoRAContext | None = getattr(model, "lora_context", None)
    if context is None:
        context = LoRAContext()
        # torch types Module.__setattr__'s value as Tensor | Module; a plain object is stored as is.
        model.lora_context = context  # type: ignore[assignment]
    return context


def _wrap(model: nn.Module, native: str) -> LoRALinear:
    module = model.get_submodule(native)
    if isinstance(module, LoRALinear):
        return module
    parent_name, _, child = native.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapped = LoRALinear(module, lora_context(model))
    setattr(parent, child, wrapped)
    return wrapped


def load_peft_adapter(model: MoETransformer, name: str, path: str | Path) -> int:
    """Loads one peft-format LoRA adapter under `name`; returns how many layers it touches."""
    pairs, scaling = read_adapter(path)
    modules = _hf_module_names(model, _architecture(model))
    for hf_module, (a_RI, b_OR) in pairs.items():
        if re.search(r"\.experts\.\d+\.", hf_module):
            raise ValueError(
                f"adapter {name!r} adapts routed experts ({hf_module}); per-request "
                "adapters cover attention and shared-expert layers: fold it into the "
                "artifact with `raymoe merge` and serve the merged artifact"
            )
        if hf_module not in modules:
            raise ValueError(f"adapter {name!r}: module {hf_module!r} is not a Linear of this model")
        _wrap(model, modules[hf_module]).add_adapter(name, a_RI, b_OR, scaling)
    lora_context(model).names.add(name)
    return len(pairs)


def attach_adapters(model: MoETransformer, adapters: dict[str, str | Path]) -> LoRAContext:
    """Loads every adapter `{name: directory}`; returns the context that selects them per row."""
    for name, path in adapters.items():
        load_peft_adapter(model, name, path)
    return lora_context(model)


def set_row_adapters(model: nn.Module, row_adapters: list[str | None] | None) -> None:
    """Selects the adapter of each row for the next forward (None or all-None = base model)."""
    if hasattr(model, "lora_context"):
        use = row_adapters if row_adapters and any(r is not None for r in row_adapters) else None
        lora_context(model).row_adapters = use


def save_peft_adapter(model: MoETransformer, name: str, path: str | Path, rank: int, alpha: float) -> Path:
    """Writes adapter `name` in peft format (each file replaced atomically); returns `path`."""
    tensors = lora_state(model, name)
    if not tensors:
        raise ValueError(f"no layer holds an adapter named {name!r}")
    return write_peft_adapter(path, LoRAConfig(rank=rank, alpha=alpha), tensors)


# --- training: one trainable adapter, base frozen --------------------------------------------


def _is_target(native: str, cfg: LoRAConfig) -> bool:
    m = re.fullmatch(r"layers\.\d+\.(attn|ffn\.shared_experts)\.(\w+)", native)
    if not m:
        return False
    if m.group(1) == "attn":
        return ALL_ATTENTION in cfg.attention_modules or m.group(2) in cfg.attention_modules
    return cfg.shared_experts


def check_lora_targets(model: MoETransformer, cfg: LoRAConfig) -> None:
    """Raises ConfigError if `lora.attention_modules` names a projection this model lacks (works
    on a model built on the meta device, so a run can be checked before anything starts)."""
    have = _attention_leaves(model)
    unknown = set(cfg.attention_modules) - have - {ALL_ATTENTION}
    require(
        not unknown,
        f"lora.attention_modules: {sorted(unknown)} is not a projection of this "
        f"model's attention (it has {sorted(have)}; `all` takes every one)",
    )
    moe_layers = list(model.moe_layers())
    require(
        not cfg.shared_experts or any(m.shared_experts is not None for m in moe_layers),
        "lora.shared_experts=true but this model has no shared experts",
    )
    require(not cfg.routed_experts or bool(moe_layers), "lora.routed_experts=true but this model has no MoE layer")


def add_trainable_lora(model: MoETransformer, cfg: LoRAConfig, seed: int) -> list[nn.Parameter]:
    """Freezes every base weight and adds adapter `TRAIN_ADAPTER` (active on every row).

    Each pair starts as peft does (A kaiming-uniform, B zero: the model is unchanged at step 0),
    drawn from (seed, module name) so every worker, whatever experts it holds, starts the same.
    Call it after expert sharding: routed-expert pairs are created for the experts held here.

    Returns:
        The trainable parameters (the adapters).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    check_lora_targets(model, cfg)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and _is_target(n, cfg)}
    for native, linear in linears.items():
        wrapped = _wrap(model, native)
        g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(native.encode()))
        a, b = init_lora_pair(linear.in_features, linear.out_features, cfg.rank, g)
        wrapped.add_adapter(TRAIN_ADAPTER, a, b, cfg.scaling)
    if cfg.routed_experts:
        for layer_id, layer in enumerate(model.layers):
            ffn = layer.ffn
            if isinstance(ffn, MoE) and isinstance(ffn.experts, GroupedExperts):
                lora = LoRAGroupedExperts(ffn.experts, cfg.rank, cfg.scaling)
                lora.init_adapters(seed, layer_id)
                ffn.register_module("experts", lora)  # replaces the frozen experts it wraps
    context = lora_context(model)
    context.names.add(TRAIN_ADAPTER)
    context.active = TRAIN_ADAPTER
    return [p for p in model.parameters() if p.requires_grad]


def _attention_leaves(model: nn.Module) -> set[str]:
    return {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if re.fullmatch(r"layers\.\d+\.attn\.\w+", n) and hasattr(m, "in_features")
    }


def lora_state(model: MoETransformer, name: str = TRAIN_ADAPTER) -> dict[str, torch.Tensor]:
    """Adapter `name` as peft-named tensors (`base_model.model.<HF module>.lora_A.weight`).

    Routed-expert pairs are named per expert (`...experts.{e}.w1.lora_A.weight` for Mixtral), for
    the experts this process holds only. Tensors are detached views of the parameters.
    """
    arch = _architecture(model)
    out: dict[str, torch.Tensor] = {}
    for native, module in model.named_modules():
        if isinstance(module, LoRALinear) and name in module.lora_A:
            hf = native_key_to_hf(native + ".weight", arch)[: -len(".weight")]
            out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = module.lora_A[name].detach()
            out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = module.lora_B[name].detach()
    if name == TRAIN_ADAPTER:
        for layer_id, module in _expert_adapters(model):
            for proj in EXPERT_PROJECTIONS:
                for local, expert in enumerate(module.expert_ids):
                    hf = expert_key(arch, layer_id, expert, proj)[: -len(".weight")]
                    out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = module.lora_A[proj][local].detach()
                    out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = module.lora_B[proj][local].detach()
    return out


def set_lora_state(model: MoETransformer, tensors: dict[str, torch.Tensor], name: str = TRAIN_ADAPTER) -> None:
    """Copies peft-named adapter tensors into the model's adapter `name` (inverse of lora_state).

    Keys for experts this process does not hold are ignored; every pair it holds must be given.
    """
    targets = lora_state(model, name)
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise KeyError(f"adapter tensors lack {len(missing)} keys this model holds, e.g. {missing[0]}")
    with torch.no_grad():
        for key, dst in targets.items():
            if tuple(tensors[key].shape) != tuple(dst.shape):
                raise ValueError(
                    f"adapter tensor {key}: shape {tuple(tensors[key].shape)}, expected {tuple(dst.shape)}"
                )
            dst.copy_(tensors[key])


def _expert_adapters(model: MoETransformer) -> list[tuple[int, LoRAGroupedExperts]]:
    found = []
    for layer_id, layer in enumerate(model.layers):
        experts = getattr(layer.ffn, "experts", None)
        if isinstance(experts, LoRAGroupedExperts):
            found.append((layer_id, experts))
    return found


def adapter_config(cfg: LoRAConfig, tensors: dict[str, torch.Tensor]) -> dict:
    """peft's adapter_config.json for a trained adapter (target_modules = HF leaf names)."""
    targets = sorted({k[len(PEFT_PREFIX) :].split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
    return {
        "peft_type": "LORA",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "target_modules": targets,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "use_rslora": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "base_model_name_or_path": None,
    }


def write_peft_adapter(
    path: str | Path, cfg: LoRAConfig, tensors: dict[str, torch.Tensor], extra_config: dict | None = None
) -> Path:
    """Writes peft-named tensors + adapter_config.json (each file replaced atomically)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**adapter_config(cfg, tensors), **(extra_config or {})}
    plain = {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}
    atomic_write(path / "adapter_model.safetensors", lambda tmp: save_file(plain, tmp, metadata={"format": "pt"}))
    atomic_write(path / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return path
