"""Reads the serving app's traffic windows into drift features. numpy + pyarrow only.

The serving app (`raymoe.serve.traffic_sampler`) writes one Parquet file per window and replica,
`window-<end unix ms, 13 digits>-<replica tag>.parquet`, one row per sampled request, with the
window's facts as JSON under the schema metadata key `raymoe.window` (format 1: start, end,
model, vocab_size, token_buckets, sample_rate, num_requests_seen, num_sampled, expert_load).
`read_window` turns a file into the features `raymoe.monitor.drift.compare_windows` takes;
`merge_windows` pools several (replicas, consecutive windows). A file that is not a readable
window of this format raises ValueError naming the path and what is wrong, so the drift job can
quarantine it.

Shapes: N rows (sampled requests), K token buckets, L MoE layers, E experts, D embedding dim.
"""

from __future__ import annotations

import functools
import json
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
META_KEY = b"raymoe.window"
_META_KEYS = (
    "start",
    "end",
    "model",
    "vocab_size",
    "token_buckets",
    "sample_rate",
    "num_requests_seen",
    "num_sampled",
    "expert_load",
)
_NAME = re.compile(r"^window-(\d{13})-(.+)\.parquet$")


@dataclass
class TrafficWindow:
    """Drift features of one window (or several merged) and the window's metadata.

    `features`: prompt_length (N,) int, output_length (N,) int, mean_logprob (M,) float (rows
    with a value), token_histogram (K,) int (summed over rows), expert_load (L, E) int, and
    embedding (N', D) float when some rows have one. `meta`: the file's `raymoe.window` JSON
    (summed / spanned when merged). `sources`: the files it was read from.
    """

    features: dict[str, np.ndarray]
    meta: dict[str, Any]
    sources: list[str] = field(default_factory=list)


def list_windows(directory: str | Path) -> list[Path]:
    """The window files in `directory`, oldest end time first (then by replica tag)."""
    found = [
        (int(m.group(1)), p.name, p)
        for p in Path(directory).glob("window-*.parquet")
        if (m := _NAME.match(p.name)) and p.is_file()
    ]
    return [p for _, _, p in sorted(found)]


def read_window(path: str | Path) -> TrafficWindow:
    """Reads one window file.

    Raises:
        ValueError: not readable as Parquet, no `raymoe.window` metadata, another format, a
            missing or mistyped column, or values that contradict the metadata; the message
            names the path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = str(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{name}: not a readable Parquet file ({exc})") from None
    try:
        meta = _meta(table.schema.metadata or {})
        features = _features(table, meta)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return TrafficWindow(features=features, meta=meta, sources=[name])


def _meta(raw: dict[bytes, bytes]) -> dict[str, Any]:
    if META_KEY not in raw:
        raise ValueError(f"no {META_KEY.decode()!r} schema metadata: not a raymoe traffic window")
    try:
        meta = json.loads(raw[META_KEY])
    except ValueError as exc:
        raise ValueError(f"{META_KEY.decode()!r} metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{META_KEY.decode()!r} metadata must be a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"window format {meta.get('format')!r}, this reader knows format {FORMAT}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{META_KEY.decode()!r} metadata lacks {missing}")
    for key in ("vocab_size", "token_buckets", "num_requests_seen", "num_sampled"):
        if not isinstance(meta[key], int) or meta[key] < 0:
            raise ValueError(f"metadata {key} must be an integer >= 0, got {meta[key]!r}")
    _expert_load(meta["expert_load"])
    return meta


def _expert_load(value) -> np.ndarray:
    try:
        load_LE = np.asarray(value, dtype=np.int64)
    except (ValueError, TypeError):
        raise ValueError("metadata expert_load must be a rectangular list of lists of integers") from None
    if load_LE.size == 0:
        return load_LE.reshape(0, 0)
    if load_LE.ndim != 2:
        raise ValueError(f"metadata expert_load must be 2-D (layers x experts), got shape {load_LE.shape}")
    if (load_LE < 0).any():
        raise ValueError("metadata expert_load has negative counts")
    return load_LE


def _column(table, name: str, kind: str, nullable: bool = False):
    """The column `name`, checked to be of `kind` (int, float, list<int>, list<float>)."""
    import pyarrow as pa

    if name not in table.column_names:
        raise ValueError(f"column {name!r} is missing")
    column = table.column(name)
    t = column.type
    item = t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) else None
    ok = {
        "int": pa.types.is_integer(t),
        "float": pa.types.is_floating(t),
        "list<int>": item is not None and pa.types.is_integer(item),
        "list<float>": item is not None and pa.types.is_floating(item),
    }[kind]
    if not ok:
        raise ValueError(f"column {name!r} is {t}, expected {kind}")
    if not nullable and column.null_count:
        raise ValueError(f"column {name!r} has {column.null_count} null value(s)")
    return column


def _matrix(column, width: int | None, name: str) -> np.ndarray:
    """The non-null rows of a list column as an (n, width) array (width: the rows' own when None)."""
    import pyarrow.compute as pc

    column = column.drop_null()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) == 0:
        return np.zeros((0, width or 0))
    width = int(lengths[0]) if width is None else width
    if (lengths != width).any():
        raise ValueError(
            f"column {name!r} rows must all hold {width} values, got lengths {sorted(set(lengths.tolist()))}"
        )
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return values.reshape(len(lengths), width)


def _features(table, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    if table.num_rows != meta["num_sampled"]:
        raise ValueError(f"{table.num_rows} rows, metadata num_sampled says {meta['num_sampled']}")
    features = {
        "prompt_length": _column(table, "prompt_length", "int").to_numpy().astype(np.int64),
        "output_length": _column(table, "output_length", "int").to_numpy().astype(np.int64),
        "mean_logprob": _column(table, "mean_logprob", "float", nullable=True)
        .drop_null()
        .to_numpy()
        .astype(np.float64),
    }
    K = meta["token_buckets"]
    buckets_NK = _matrix(_column(table, "prompt_token_buckets", "list<int>"), K, "prompt_token_buckets")
    if (buckets_NK < 0).any():
        raise ValueError("column 'prompt_token_buckets' has negative counts")
    features["token_histogram"] = buckets_NK.astype(np.int64).sum(axis=0)
    features["expert_load"] = _expert_load(meta["expert_load"])
    if "embedding" in table.column_names:
        embedding_ND = _matrix(_column(table, "embedding", "list<float>", nullable=True), None, "embedding")
        if len(embedding_ND):
            features["embedding"] = embedding_ND.astype(np.float32)  # as stored; detectors upcast
    return features


def merge_windows(windows: list[TrafficWindow]) -> TrafficWindow:
    """Pools windows: rows concatenated, token histograms and expert loads summed, the time span
    and request counts combined.

    Raises:
        ValueError: no windows, or windows that cannot be pooled (another vocab_size,
            token_buckets, expert_load shape or embedding width); the message names both files.
    """
    if not windows:
        raise ValueError("no traffic windows to merge")
    first = windows[0]
    for w in windows[1:]:
        for key in ("vocab_size", "token_buckets"):
            if w.meta[key] != first.meta[key]:
                raise ValueError(
                    f"cannot merge traffic windows: {_name(first)} has {key}={first.meta[key]}, "
                    f"{_name(w)} has {key}={w.meta[key]}"
                )
        a, b = first.features["expert_load"].shape, w.features["expert_load"].shape
        if a != b:
            raise ValueError(
                f"cannot merge traffic windows: {_name(first)} has expert_load of shape {a}, {_name(w)} of shape {b}"
            )
    with_embedding = [w for w in windows if "embedding" in w.features]
    for w in with_embedding[1:]:
        a, b = with_embedding[0].features["embedding"].shape[1], w.features["embedding"].shape[1]
        if a != b:
            raise ValueError(
                f"cannot merge traffic windows: {_name(with_embedding[0])} has {a}-dim embeddings, "
                f"{_name(w)} has {b}-dim"
            )
    features = {
        key: np.concatenate([w.features[key] for w in windows])
        for key in ("prompt_length", "output_length", "mean_logprob")
    }
    features["token_histogram"] = functools.reduce(operator.add, [w.features["token_histogram"] for w in windows])
    features["expert_load"] = functools.reduce(operator.add, [w.features["expert_load"] for w in windows])
    if with_embedding:
        features["embedding"] = np.concatenate([w.features["embedding"] for w in with_embedding])
    models = sorted({str(w.meta["model"]) for w in windows})
    rates = {w.meta["sample_rate"] for w in windows}
    meta = {
        "format": FORMAT,
        "start": min(w.meta["start"] for w in windows),
        "end": max(w.meta["end"] for w in windows),
        "model": ",".join(models),
        "vocab_size": first.meta["vocab_size"],
        "token_buckets": first.meta["token_buckets"],
        # Windows sampled at different rates have no single rate.
        "sample_rate": rates.pop() if len(rates) == 1 else None,
        "num_requests_seen": sum(w.meta["num_requests_seen"] for w in windows),
        "num_sampled": sum(w.meta["num_sampled"] for w in windows),
        "expert_load": features["expert_load"].tolist(),
        "num_windows": sum(w.meta.get("num_windows", 1) for w in windows),
    }
    return TrafficWindow(features=features, meta=meta, sources=[s for w in windows for s in w.sources])


def _name(window: TrafficWindow) -> str:
    return ",".join(window.sources) or "<window without a file>"
