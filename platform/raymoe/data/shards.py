"""Token shards: Parquet files with one `tokens` column of fixed-size int32 lists.

Each row is one packed sequence of `seq_len + 1` tokens. Row groups are small (a few hundred rows)
so a loader streams a shard one row group at a time. Shards are written atomically and the same
rows always give the same bytes (fixed writer options, no timestamps), so a checksum identifies
a shard's content.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymoe.atomic_io import atomic_write_bytes, sha256_bytes, sha256_file

TOKENS_COLUMN = "tokens"


def encode_shard(rows_NL: np.ndarray, row_group_rows: int) -> bytes:
    """Parquet bytes for rows of token ids (shape (N, L), any integer dtype that fits int32)."""
    if rows_NL.ndim != 2:
        raise ValueError(f"shard rows must be 2-D (rows, row_len), got shape {rows_NL.shape}")
    if row_group_rows < 1:
        raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
    flat = pa.array(np.ascontiguousarray(rows_NL, dtype=np.int32).ravel(), type=pa.int32())
    column = pa.FixedSizeListArray.from_arrays(flat, rows_NL.shape[1])
    table = pa.table({TOKENS_COLUMN: column})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_rows, compression="zstd", write_statistics=False)
    return sink.getvalue().to_pybytes()


def write_shard(path: str | Path, rows_NL: np.ndarray, row_group_rows: int) -> dict:
    """Writes a shard atomically; an identical existing shard is left untouched.

    Returns:
        {"rows", "tokens", "bytes", "sha256", "row_groups", "written"} for the manifest
        (`written` is False when the file already held exactly these bytes).
    """
    data = encode_shard(rows_NL, row_group_rows)
    digest = sha256_bytes(data)
    path = Path(path)
    written = not (path.is_file() and path.stat().st_size == len(data) and sha256_file(path) == digest)
    if written:
        atomic_write_bytes(path, data)
    n = rows_NL.shape[0]
    return {
        "rows": int(n),
        "tokens": int(rows_NL.size),
        "bytes": len(data),
        "sha256": digest,
        "row_groups": -(-n // row_group_rows),
        "written": written,
    }


def _to_numpy(column: pa.ChunkedArray | pa.Array, row_len: int | None) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.list_(pa.int32()))
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    if row_len is None:
        row_len = (
            column.type.list_size if pa.types.is_fixed_size_list(column.type) else (len(flat) // max(len(column), 1))
        )
    return flat.reshape(-1, row_len) if row_len else flat.reshape(0, 0)


def read_shard(path: str | Path) -> np.ndarray:
    """All rows of a shard as an int32 array (rows, row_len)."""
    table = pq.read_table(path, columns=[TOKENS_COLUMN])
    return _to_numpy(table.column(TOKENS_COLUMN), None)


def row_group_sizes(path: str | Path) -> list[int]:
    """Rows in each row group of a shard (from the footer; no data read)."""
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def read_row_group(path: str | Path, index: int) -> np.ndarray:
    """One row group of a shard as an int32 array (rows, row_len)."""
    table = pq.ParquetFile(path).read_row_group(index, columns=[TOKENS_COLUMN])
    return _to_numpy(table.column(TOKENS_COLUMN), None)


def iter_rows(path: str | Path) -> Iterator[np.ndarray]:
    """Streams a shard row group by row group, yielding (rows, row_len) arrays."""
    for i in range(len(row_group_sizes(path))):
        yield read_row_group(path, i)
