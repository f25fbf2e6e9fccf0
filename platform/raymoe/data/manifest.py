"""manifest.json: what an ingest run produced and how, with checksums to verify it.

Keys (all paths relative to the manifest's directory):
    format_version   1
    created_at       ISO-8601 UTC time of writing (the only field that differs between reruns)
    config           the ingest config (without output_dir) and `config_hash`, its SHA-256
    tokenizer        {"dir", "hash", "vocab_size", "eos_id", "trained"}
    seq_len, row_len seq_len + 1 tokens per row; `dtype` "int32"
    counts           read, quarantined/filtered/duplicates by reason, kept and written per split
    sources          per source: files, records, bytes, kept_docs, weight
    shards           [{"path", "split", "rows", "tokens", "bytes", "sha256", "row_groups"}]
    profile          token unigram histogram and document length histogram (see profile.py)
"""

from __future__ import annotations

import json
from pathlib import Path

from raymoe.atomic_io import atomic_write_bytes, sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
VOLATILE_KEYS = ("created_at",)
REQUIRED_KEYS = ("format_version", "tokenizer", "seq_len", "row_len", "shards", "counts")


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Writes `manifest.json` atomically with sorted keys (stable bytes for equal content)."""
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    return atomic_write_bytes(Path(out_dir) / MANIFEST_NAME, text.encode("utf-8"))


def read_manifest(out_dir: str | Path) -> dict:
    """Reads and checks a manifest.

    Raises:
        FileNotFoundError: no manifest.json in `out_dir` (the run did not finish).
        ValueError: unknown format version or a required key missing.
    """
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {str(out_dir)!r}: run the ingest pipeline")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version must be {FORMAT_VERSION}, got {version!r}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    return manifest


def stable_view(manifest: dict) -> dict:
    """The manifest without its timestamp: equal for reruns on the same inputs and config."""
    return {k: v for k, v in manifest.items() if k not in VOLATILE_KEYS}


def verify_shards(out_dir: str | Path, manifest: dict, split: str | None = None) -> None:
    """Checks that every listed shard exists with the recorded size and SHA-256.

    Raises:
        ValueError: naming the first shard that is missing or differs.
    """
    for shard in manifest["shards"]:
        if split is not None and shard["split"] != split:
            continue
        path = Path(out_dir) / shard["path"]
        if not path.is_file():
            raise ValueError(f"shard {shard['path']} listed in the manifest is missing")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise ValueError(f"shard {shard['path']}: {size} bytes, manifest says {shard['bytes']}")
        digest = sha256_file(path)
        if digest != shard["sha256"]:
            raise ValueError(f"shard {shard['path']}: sha256 {digest}, manifest says {shard['sha256']}")
