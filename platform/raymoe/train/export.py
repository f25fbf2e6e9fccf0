"""Export a sharded training checkpoint as the Hugging Face artifact everything downstream uses.

    raymoe export runs/train-debug/checkpoints artifacts/debug        # newest valid checkpoint
    raymoe export runs/train-debug/checkpoints/step-00000200 artifacts/debug

The checkpoint is verified, every expert shard is gathered into one full model (a 1 x 1 layout
load), and `save_hf` writes safetensors + config.json; the tokenizer files are copied and
`raymoe_manifest.json` links back to the checkpoint and the data manifest it was trained on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from raymoe.atomic_io import atomic_write_json, sha256_file
from raymoe.config import from_dict
from raymoe.models import MoETransformer, ModelConfig, save_hf
from raymoe.train.checkpoint import (
    latest_valid_checkpoint,
    load_checkpoint,
    step_dir_name,
    verify_checkpoint,
)

EXPORT_MANIFEST = "raymoe_manifest.json"


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """(root uri, step) for a `step-*` directory or a checkpoint root (newest valid step)."""
    stripped = path.rstrip("/")
    m = re.search(r"/?step-(\d{8})$", stripped)
    if m:
        return stripped[: m.start()] or ".", int(m.group(1))
    step = latest_valid_checkpoint(stripped)
    if step is None:
        raise FileNotFoundError(f"no complete, valid checkpoint under {path!r}")
    return stripped, step


def export_checkpoint(checkpoint: str, out_dir: str) -> dict[str, Any]:
    """Writes the HF-format artifact for `checkpoint` into `out_dir`.

    Args:
        checkpoint: a checkpoint root (newest valid step is used) or one `step-*` directory.
        out_dir: output directory (created).

    Returns:
        The export manifest written to `out_dir/raymoe_manifest.json`.
    """
    root, step = resolve_checkpoint(checkpoint)
    manifest = verify_checkpoint(root, step)
    if "model_config" not in manifest:
        raise ValueError(f"{root}/{step_dir_name(step)}: manifest has no model_config to rebuild from")
    model = MoETransformer(from_dict(ModelConfig, manifest["model_config"], prefix="model"))
    # No groups: a 1 x 1 layout holding every expert, read from every shard of any saved layout.
    load_checkpoint(root, step, model=model, optimizer=None, groups=None)
    data = manifest.get("data", {})
    tokenizer_dir = data.get("tokenizer_dir") or None
    out = Path(out_dir)
    arch = save_hf(model, out, tokenizer_dir=tokenizer_dir)
    export = {
        "format": "raymoe-export/1",
        "architecture": arch,
        "checkpoint": {"uri": root, "step": step, "layout": manifest["layout"]},
        "data_manifest": data.get("manifest", ""),
        "tokenizer_dir": tokenizer_dir or "",
        "train_config": manifest.get("train_config", {}),
        "files": {p.name: sha256_file(p) for p in sorted(out.iterdir())
                  if p.is_file() and p.name != EXPORT_MANIFEST},
    }
    atomic_write_json(out / EXPORT_MANIFEST, export)
    return export
