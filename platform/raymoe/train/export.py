"""Export a sharded training checkpoint as the Hugging Face artifact everything downstream uses.

    raymoe export runs/train-debug/checkpoints artifacts/debug        # newest valid checkpoint
    raymoe export runs/train-debug/checkpoints/step-00000200 artifacts/debug

Training checkpoints already name tensors the Hugging Face way (raymoe.models.state_dict_adapter),
so export is a streaming copy: `model.safetensors` is written tensor by tensor, each read from its
shard (dense.safetensors or the expert file holding it) and checked against its digest. The
process holds one tensor at a time, never a layer's experts, let alone the model. config.json and
the tokenizer files are written as `save_hf` writes them, and `raymoe_manifest.json` links back
to the checkpoint and the data manifest it was trained on.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import torch

from raymoe.atomic_io import atomic_write, atomic_write_json, sha256_file
from raymoe.config import from_dict
from raymoe.models import ModelConfig, MoETransformer
from raymoe.models.hf_io import save_hf_config
from raymoe.models.state_dict_adapter import held_tensors
from raymoe.models.tensor_files import LazyTensor, write_tensor_file
from raymoe.train.checkpoint_format import CheckpointReader, latest_valid_checkpoint, step_dir_name

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

    Raises:
        CheckpointCorrupt: a shard or tensor is missing or fails its checksum.
    """
    root, step = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with CheckpointReader(root, step) as reader:
        manifest = reader.manifest
        if "model_config" not in manifest:
            raise ValueError(f"{root}/{step_dir_name(step)}: manifest has no model_config to rebuild from")
        cfg = from_dict(ModelConfig, manifest["model_config"], prefix="model")
        arch = manifest["architecture"]
        # On the meta device: the model only names the tensors (every expert, HF set), in order.
        with torch.device("meta"):
            names = MoETransformer(cfg)
        entries = []
        for held in held_tensors(names, arch):
            file = reader.file_for(held)
            entries.append(
                (
                    held.key,
                    LazyTensor(
                        file.dtype(held.key), file.shape(held.key), functools.partial(reader.read, file, held.key)
                    ),
                )
            )

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                write_tensor_file(fh, entries, metadata={"format": "pt"}, tensor_digests=False)

        atomic_write(out / "model.safetensors", write)
    data = manifest.get("data", {})
    tokenizer_dir = data.get("tokenizer_dir") or None
    save_hf_config(out, cfg, arch, tokenizer_dir)
    export = {
        "format": "raymoe-export/1",
        "architecture": arch,
        "checkpoint": {"uri": root, "step": step, "layout": manifest["layout"]},
        "data_manifest": data.get("manifest", ""),
        "tokenizer_dir": tokenizer_dir or "",
        "train_config": manifest.get("train_config", {}),
        "files": {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != EXPORT_MANIFEST},
    }
    atomic_write_json(out / EXPORT_MANIFEST, export)
    return export
