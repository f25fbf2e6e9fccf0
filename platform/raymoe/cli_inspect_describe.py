"""What a checkpoint, artifact, adapter or ingest output is, read from its manifests as plain data
(`describe`), and the re-read of its files against the recorded checksums (`verify`); the readers
behind `raymoe inspect` (`raymoe.cli_inspect` prints what they return).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"step-(\d{8})$")
MANIFEST_FILES = ("manifest.json", "raymoe_manifest.json", "raymoe_merge.json", "adapter_config.json", "config.json")


class NotRecognised(ValueError):
    """PATH is none of the things `inspect` knows."""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _params(model_config: Any) -> dict[str, Any]:
    """Architecture numbers of a ModelConfig (or its dict): sizes and parameter counts."""
    from raymoe.config import from_dict
    from raymoe.models.config import ModelConfig
    from raymoe.models.param_count import parameter_counts

    cfg = model_config if isinstance(model_config, ModelConfig) else from_dict(ModelConfig, model_config)
    total, active = parameter_counts(cfg)
    return {
        "params": total,
        "active_params": active,
        "dim": cfg.dim,
        "num_layers": cfg.num_layers,
        "num_experts": cfg.moe.num_experts,
        "top_k": cfg.moe.num_experts_per_tok,
        "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_seq_len,
    }


def _data_summary(manifest_path: str) -> dict[str, Any]:
    """An ingest manifest as lineage: where, whether it is still there, what it holds."""
    out: dict[str, Any] = {"manifest": manifest_path, "exists": False}
    manifest = _read_json(Path(manifest_path)) if manifest_path else None
    if manifest is None:
        return out
    shards = manifest.get("shards", [])
    out.update(
        exists=True,
        created_at=manifest.get("created_at"),
        config_hash=manifest.get("config_hash"),
        tokenizer_hash=manifest.get("tokenizer", {}).get("hash"),
        shards=len(shards),
        tokens=sum(s.get("tokens", 0) for s in shards),
        kept_docs=manifest.get("counts", {}).get("kept_docs"),
    )
    return out


def _checkpoint_step(root: str, step: int) -> dict[str, Any]:
    from raymoe.train.checkpoint_format import read_manifest, step_dir_name

    manifest = read_manifest(root, step)
    train = manifest.get("train_config", {})
    data = manifest.get("data", {})
    info: dict[str, Any] = {
        "kind": "checkpoint",
        "path": f"{root}/{step_dir_name(step)}",
        "format": manifest.get("format"),
        "step": manifest.get("step"),
        "layout": manifest.get("layout"),
        "loss": manifest.get("metrics", {}).get("loss"),
        "architecture": manifest.get("architecture"),
        "data_position": manifest.get("data_position"),
        "run": {"name": train.get("name"), "steps": train.get("steps")},
        "lineage": {"data": _data_summary(data.get("manifest", "")), "tokenizer_dir": data.get("tokenizer_dir")},
        "files": {name: meta.get("sha256") for name, meta in sorted(manifest.get("files", {}).items())},
    }
    if "model_config" in manifest:
        info["model"] = _params(manifest["model_config"])
    return info


def _checkpoint_root(root: str, steps: list[int]) -> dict[str, Any]:
    info = _checkpoint_step(root, steps[-1])
    info.update(kind="checkpoint root", path=root, steps=steps, newest=info["path"])
    return info


def _artifact(path: Path) -> dict[str, Any]:
    from raymoe.models.hf_io import read_hf_config

    cfg, arch = read_hf_config(path)
    info: dict[str, Any] = {
        "kind": "artifact",
        "path": str(path),
        "architecture": arch,
        "model": _params(cfg),
        "step": None,
        "layout": None,
        "loss": None,
        "lineage": {},
    }
    export = _read_json(path / "raymoe_manifest.json")
    merge = _read_json(path / "raymoe_merge.json")
    if export is not None:
        ckpt = export.get("checkpoint", {})
        info.update(step=ckpt.get("step"), layout=ckpt.get("layout"), format=export.get("format"))
        info["run"] = {
            "name": export.get("train_config", {}).get("name"),
            "steps": export.get("train_config", {}).get("steps"),
        }
        step_manifest = Path(str(ckpt.get("uri", ""))) / f"step-{int(ckpt.get('step') or 0):08d}" / "manifest.json"
        source = _read_json(step_manifest) if ckpt.get("uri") else None
        info["loss"] = (source or {}).get("metrics", {}).get("loss")
        info["lineage"] = {
            "checkpoint": {"path": str(step_manifest.parent), "exists": source is not None},
            "data": _data_summary(export.get("data_manifest", "")),
            "tokenizer_dir": export.get("tokenizer_dir") or None,
        }
        info["files"] = export.get("files", {})
    if merge is not None:
        info["kind"] = "merged artifact"
        base = Path(merge.get("base", ""))
        info["lineage"]["merged"] = {
            "base": str(base),
            "adapter": merge.get("adapter"),
            "adapter_sha256": merge.get("adapter_sha256"),
            "scaling": merge.get("scaling"),
            "modules": merge.get("modules"),
        }
        if base.is_dir() and (base / "config.json").is_file():
            parent = _artifact(base)
            info.update(step=parent["step"], layout=parent["layout"], loss=parent["loss"])
            info["lineage"].update({k: v for k, v in parent["lineage"].items() if k != "merged"})
    if "files" not in info:
        info["files"] = {p.name: None for p in sorted(path.iterdir()) if p.is_file()}
    return info


def _adapter(path: Path) -> dict[str, Any]:
    from raymoe.atomic_io import sha256_file

    config = _read_json(path / "adapter_config.json") or {}
    weights = path / "adapter_model.safetensors"
    info: dict[str, Any] = {
        "kind": "adapter",
        "path": str(path),
        "architecture": config.get("peft_type"),
        "adapter": {
            "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"),
            "target_modules": config.get("target_modules"),
        },
        "step": None,
        "layout": None,
        "loss": None,
        "lineage": {"base": config.get("base_model_name_or_path")},
        "files": {weights.name: sha256_file(weights)} if weights.is_file() else {},
    }
    run = _read_json(path.parent / "metrics.json")  # the fine-tuning / federated run that wrote it
    if run is not None and Path(str(run.get("adapter", ""))).resolve() == path.resolve():
        train = run.get("train") or {}
        history = run.get("history") or []
        info["loss"] = train.get("final_loss", train.get("loss"))
        if history:  # a federated run: the server's held-out loss after the last round
            info["rounds"] = run.get("rounds")
            info["loss"] = history[-1].get("eval_loss")
        info["lineage"]["run"] = {k: run[k] for k in ("data", "eval", "rounds", "silos") if k in run}
    return info


def _ingest(path: Path) -> dict[str, Any]:
    from raymoe.data.manifest import read_manifest

    manifest = read_manifest(path)
    shards = manifest["shards"]
    splits: dict[str, dict[str, int]] = {}
    for s in shards:
        split = splits.setdefault(s["split"], {"shards": 0, "rows": 0, "tokens": 0})
        split["shards"] += 1
        split["rows"] += s.get("rows", 0)
        split["tokens"] += s.get("tokens", 0)
    tok = manifest["tokenizer"]
    return {
        "kind": "ingest output",
        "path": str(path),
        "step": None,
        "layout": None,
        "loss": None,
        "architecture": None,
        "seq_len": manifest["seq_len"],
        "splits": splits,
        "created_at": manifest.get("created_at"),
        "counts": manifest["counts"],
        "lineage": {
            "config_hash": manifest.get("config_hash"),
            "sources": manifest.get("sources", {}),
            "tokenizer": {
                "dir": str(path / tok.get("dir", "tokenizer")),
                "hash": tok.get("hash"),
                "vocab_size": tok.get("vocab_size"),
            },
        },
        "files": {s["path"]: s.get("sha256") for s in shards},
    }


def describe(path: str) -> dict[str, Any]:
    """What `path` is, as plain data (`--json` prints it as is).

    Raises:
        NotRecognised: `path` is missing or none of the recognised kinds.
    """
    from raymoe.train.checkpoint_format import list_checkpoints

    if "://" in path:  # a checkpoint root on an object store
        steps = list_checkpoints(path)
        if not steps:
            raise NotRecognised(f"{path}: no checkpoint step with a manifest.json under it")
        return _checkpoint_root(path.rstrip("/"), steps)
    p = Path(path).resolve()
    if p.is_file() and p.name in MANIFEST_FILES:
        p = p.parent
    if not p.is_dir():
        what = "a file" if p.exists() else "no such file or directory"
        raise NotRecognised(f"{path}: {what}; expected a checkpoint, artifact, adapter or ingest output directory")
    m = STEP_DIR.search(p.name)
    if m and (p / "manifest.json").is_file():
        return _checkpoint_step(str(p.parent), int(m.group(1)))
    if (p / "adapter_config.json").is_file():
        return _adapter(p)
    if (p / "config.json").is_file():
        return _artifact(p)
    manifest = _read_json(p / "manifest.json")
    if manifest is not None and "format_version" in manifest:
        return _ingest(p)
    steps = list_checkpoints(str(p))
    if steps:
        return _checkpoint_root(str(p), steps)
    raise NotRecognised(
        f"{path}: not a checkpoint, artifact, adapter or ingest output "
        f"(found none of step-*/manifest.json, config.json, adapter_config.json, manifest.json)"
    )


def verify(info: dict[str, Any]) -> str:
    """Re-reads the files of `info` and checks them against its recorded checksums.

    Returns:
        A one-line result.

    Raises:
        ValueError: naming the first file that is missing or differs.
    """
    from raymoe.atomic_io import sha256_file

    kind, path = info["kind"], info["path"]
    if kind in ("checkpoint", "checkpoint root"):
        from raymoe.train.checkpoint_format import CheckpointCorrupt, verify_checkpoint

        root = str(Path(info.get("newest", path)).parent) if "://" not in path else path
        try:
            verify_checkpoint(root, info["step"])
        except CheckpointCorrupt as exc:
            raise ValueError(str(exc)) from None
    elif kind == "ingest output":
        from raymoe.data.manifest import read_manifest, verify_shards

        verify_shards(path, read_manifest(path))
    elif kind == "adapter":
        return "verified: nothing recorded to check an adapter against (its sha256 is shown above)"
    else:
        for name, digest in info["files"].items():
            if digest is None:
                continue
            if not (Path(path) / name).is_file():
                raise ValueError(f"{path}/{name}: missing")
            if sha256_file(Path(path) / name) != digest:
                raise ValueError(f"{path}/{name}: checksum mismatch (recorded {digest})")
    checked = sum(1 for d in info["files"].values() if d)
    if not checked:
        return "verified: no checksums recorded (not a `raymoe export` output)"
    return f"verified: {checked} files match their recorded checksums"
