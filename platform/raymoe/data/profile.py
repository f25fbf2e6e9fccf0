"""Reference profile of a dataset, stored in the manifest for drift monitoring.

Two histograms: token unigram counts over the training shards (length = vocab size) and document
lengths in tokens over power-of-two bins. A drift job compares live traffic against these.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Bin edges in tokens: [0, 16), [16, 32), ... [2**20, inf).
DOC_LENGTH_EDGES = [0] + [2**k for k in range(4, 21)]


def token_unigram(rows: Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
    """Counts of each token id over all rows (int64, length `vocab_size`)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for block in rows:
        flat = np.asarray(block).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
            raise ValueError(f"token id out of range [0, {vocab_size}): {flat.min()}..{flat.max()}")
        counts += np.bincount(flat, minlength=vocab_size)
    return counts


def length_histogram(lengths: Iterable[int], edges: list[int] = DOC_LENGTH_EDGES) -> list[int]:
    """Counts per bin; bin i holds edges[i] <= length < edges[i+1], the last bin is open."""
    idx = np.searchsorted(np.asarray(edges), np.fromiter(lengths, dtype=np.int64), side="right") - 1
    return np.bincount(idx, minlength=len(edges)).astype(int).tolist() if idx.size else [0] * len(edges)


def reference_profile(unigram: np.ndarray, doc_lengths: list[int]) -> dict:
    """The manifest's `profile` section."""
    return {
        "token_unigram": {"vocab_size": len(unigram), "counts": unigram.astype(int).tolist()},
        "doc_length_tokens": {"edges": list(DOC_LENGTH_EDGES), "counts": length_histogram(doc_lengths)},
    }
