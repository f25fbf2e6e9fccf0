"""Fold a peft-format LoRA adapter into an HF-format artifact: W' = W + (alpha / r) * B @ A.

Works on the artifact's tensors by name, one safetensors file at a time, so it needs neither the
model class nor more memory than the largest weight file. Attention and shared-expert pairs map to
`<module>.weight`; routed-expert pairs are per expert (`...experts.{e}.w1.lora_A.weight`) and map
to that expert's matrix, which is how HF checkpoints store experts. The result loads anywhere the
base does (raymoe, transformers) and serves without any LoRA code.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raymoe.atomic_io import atomic_write, atomic_write_json, sha256_file

PEFT_PREFIX = "base_model.model."
# Files beside the weights that the merged artifact keeps as they are.
_COPIED = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """({HF module name: (A (r, in), B (out, r))}, scaling) of a peft LoRA adapter directory."""
    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"adapter {str(adapter_dir)!r}: missing {f.name}")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {str(adapter_dir)!r}: peft_type {config.get('peft_type')!r} is not LORA")
    # Variants whose maths differs from W + alpha / r * B @ A are refused rather than misapplied.
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"adapter {str(adapter_dir)!r}: {key} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter {str(adapter_dir)!r}: bias={config['bias']!r} is not supported (only none)")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(weights_file)).items():
        bare = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        for part in ("lora_A", "lora_B"):
            if f".{part}." in bare:
                halves.setdefault(bare.split(f".{part}.")[0], {})[part] = value
    pairs = {}
    for module, half in halves.items():
        if set(half) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter {str(adapter_dir)!r}: {module} lacks lora_A or lora_B")
        pairs[module] = (half["lora_A"], half["lora_B"])
    if not pairs:
        raise ValueError(f"adapter {str(adapter_dir)!r}: no lora_A/lora_B tensors")
    return pairs, scaling


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes `out_dir`: the artifact at `base_dir` with the adapter folded into its weights.

    Raises:
        ValueError: an adapter module has no weight in the artifact, or shapes do not fit.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if base_dir.resolve() == out_dir.resolve():
        raise ValueError("merge: the output directory must differ from the base artifact")
    pairs, scaling = read_adapter(adapter_dir)
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"merge: no safetensors weights in {str(base_dir)!r}")
    # Every adapter module must have its weight before anything is written.
    weights = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            # safe_open handles are not iterable (safetensors 0.8): .keys() is required.
            weights |= {k[: -len(".weight")] for k in handle.keys() if k.endswith(".weight")}  # noqa: SIM118
    unused = sorted(set(pairs) - weights)
    if unused:
        raise ValueError(f"merge: adapter module {unused[0]} has no weight in {str(base_dir)!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for file in files:
        tensors = load_file(str(file))
        for key, weight in tensors.items():
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if module not in pairs:
                continue
            a_RI, b_OR = pairs[module]
            if (b_OR.shape[0], a_RI.shape[1]) != tuple(weight.shape):
                raise ValueError(
                    f"merge: adapter for {module} is {b_OR.shape[0]}x{a_RI.shape[1]}, "
                    f"the weight is {tuple(weight.shape)}"
                )
            delta = (b_OR.to(torch.float32) @ a_RI.to(torch.float32)) * scaling
            tensors[key] = (weight.to(torch.float32) + delta).to(weight.dtype)
            used.add(module)
        atomic_write(out_dir / file.name, functools.partial(save_file, tensors, metadata={"format": "pt"}))
    for name in _COPIED:
        if (base_dir / name).is_file():
            atomic_write(out_dir / name, functools.partial(shutil.copyfile, base_dir / name))
    atomic_write_json(
        out_dir / "raymoe_merge.json",
        {
            "base": str(base_dir.resolve()),
            "adapter": str(Path(adapter_dir).resolve()),
            "adapter_sha256": sha256_file(Path(adapter_dir) / "adapter_model.safetensors"),
            "scaling": scaling,
            "modules": len(used),
        },
    )
    return out_dir
