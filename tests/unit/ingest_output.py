"""A minimal ingest output (manifest.json + Parquet token shards) written from token rows, for tests
that train: the same format `python -m pipelines.ingest` writes, without running it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raymoe.data.manifest import write_manifest
from raymoe.data.shards import write_shard


def write_ingest_output(
    out: Path, rows: np.ndarray, *, rows_per_shard: int = 32, row_group_rows: int = 4, vocab_size: int = 2048
) -> Path:
    """Writes `rows` (N, seq_len + 1) as train shards under `out`; returns `out`."""
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "tokenizer").mkdir(exist_ok=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    shards = []
    for i, start in enumerate(range(0, len(rows), rows_per_shard)):
        name = f"shards/train-{i:05d}.parquet"
        meta = write_shard(out / name, rows[start : start + rows_per_shard], row_group_rows)
        meta.pop("written")
        shards.append({"path": name, "split": "train", **meta})
    write_manifest(
        out,
        {
            "format_version": 1,
            "seq_len": rows.shape[1] - 1,
            "row_len": rows.shape[1],
            "tokenizer": {"dir": "tokenizer", "hash": "test", "vocab_size": vocab_size},
            "shards": shards,
            "counts": {},
        },
    )
    return out
