"""Packing: documents -> fixed rows of `seq_len + 1` tokens with EOS at document boundaries.

Every document is followed by `<|endoftext|>` and the stream is cut into rows of `seq_len + 1`
tokens, so a row gives `seq_len` next-token targets (inputs row[:-1], labels row[1:]) with no
padding inside. A document may span rows; the model learns across boundaries from the EOS.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def pack_documents(
    docs: Iterable[np.ndarray], seq_len: int, eos_id: int, pad_last: bool = False
) -> tuple[np.ndarray, int]:
    """Concatenates `doc + [eos]` for each document and cuts the stream into rows.

    Args:
        docs: token ids of each document, in the order they should appear.
        seq_len: model context; rows have `seq_len + 1` tokens.
        eos_id: id appended after every document (also the pad id).
        pad_last: pad the final partial row with `eos_id` instead of dropping it.

    Returns:
        (rows, dropped): int32 array of shape (num_rows, seq_len + 1) and the number of tail
        tokens dropped (0 when `pad_last`).
    """
    if seq_len < 1:
        raise ValueError(f"pack.seq_len must be >= 1, got {seq_len}")
    row_len = seq_len + 1
    parts: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.int32)
    for doc in docs:
        parts.append(np.asarray(doc, dtype=np.int32))
        parts.append(eos)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    num_full = len(stream) // row_len
    tail = len(stream) - num_full * row_len
    if pad_last and tail:
        pad = np.full(row_len - tail, eos_id, dtype=np.int32)
        return np.concatenate([stream, pad]).reshape(-1, row_len), 0
    return stream[: num_full * row_len].reshape(num_full, row_len), tail
