"""LoRA adapters on the model's `nn.Linear` layers, several at once, chosen per batch row.

LoRA (Hu et al. 2021): a frozen weight W gets a low-rank update, y = x W^T + s * (x A^T) B^T with
A (r, in), B (out, r) and s = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA). Adapters are
read and written in Hugging Face peft's format (`adapter_config.json`, `adapter_model.safetensors`
with keys `base_model.model.<HF module>.lora_A.weight`), names mapped by the state-dict adapter.
Several adapters stay loaded; a shared `LoRAContext` says which one each batch row uses (as in
Punica / S-LoRA multi-adapter serving), so requests for different adapters share one batch.

Shapes: B batch rows, T tokens, I in features, O out features, R rank.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raymoe.atomic_io import atomic_write
from raymoe.models.state_dict_adapter import native_key_to_hf

PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAContext:
    """Which adapter each row of the next forward uses (None = base weights), shared by all layers."""

    row_adapters: list[str | None] | None = None
    names: set[str] = field(default_factory=set)  # adapters loaded


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


def _architecture(model: nn.Module) -> str:
    from raymoe.models.hf_config import hf_architecture_for

    return getattr(model, "hf_architecture", None) or hf_architecture_for(model.cfg)


def lora_context(model: nn.Module) -> LoRAContext:
    """The model's shared LoRA context (created on first use)."""
    if not hasattr(model, "lora_context"):
        model.lora_context = LoRAContext()
    return model.lora_context


def _wrap(model: nn.Module, native: str) -> LoRALinear:
    module = model.get_submodule(native)
    if isinstance(module, LoRALinear):
        return module
    parent_name, _, child = native.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapped = LoRALinear(module, lora_context(model))
    setattr(parent, child, wrapped)
    return wrapped


def load_peft_adapter(model: nn.Module, name: str, path: str | Path) -> int:
    """Loads one peft-format LoRA adapter under `name`; returns how many layers it touches."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"adapter {name!r}: missing {f}")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(weights_file))
    modules = _hf_module_names(model, _architecture(model))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        bare = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in bare:
                hf_module = bare.split(marker)[0]
                pairs.setdefault(hf_module, {})[part] = value
    if not pairs:
        raise ValueError(f"adapter {name!r}: no lora_A/lora_B tensors in {weights_file}")
    for hf_module, pair in pairs.items():
        if hf_module not in modules:
            raise ValueError(f"adapter {name!r}: module {hf_module!r} is not a Linear of this model")
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter {name!r}: {hf_module} lacks lora_A or lora_B")
        _wrap(model, modules[hf_module]).add_adapter(name, pair["lora_A"], pair["lora_B"], scaling)
    lora_context(model).names.add(name)
    return len(pairs)


def attach_adapters(model: nn.Module, adapters: dict[str, str | Path]) -> LoRAContext:
    """Loads every adapter `{name: directory}`; returns the context that selects them per row."""
    for name, path in adapters.items():
        load_peft_adapter(model, name, path)
    return lora_context(model)


def set_row_adapters(model: nn.Module, row_adapters: list[str | None] | None) -> None:
    """Selects the adapter of each row for the next forward (None or all-None = base model)."""
    if hasattr(model, "lora_context"):
        use = row_adapters if row_adapters and any(r is not None for r in row_adapters) else None
        model.lora_context.row_adapters = use


def save_peft_adapter(model: nn.Module, name: str, path: str | Path, rank: int, alpha: float) -> Path:
    """Writes adapter `name` in peft format (each file replaced atomically); returns `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arch = _architecture(model)
    tensors, targets = {}, set()
    for native, module in model.named_modules():
        if isinstance(module, LoRALinear) and name in module.lora_A:
            hf = native_key_to_hf(native + ".weight", arch)[: -len(".weight")]
            tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = module.lora_A[name].detach().cpu().contiguous()
            tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = module.lora_B[name].detach().cpu().contiguous()
            targets.add(hf.rsplit(".", 1)[-1])
    if not tensors:
        raise ValueError(f"no layer holds an adapter named {name!r}")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(targets),
              "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False}
    atomic_write(path / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return path

