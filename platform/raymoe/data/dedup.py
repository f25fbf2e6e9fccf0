"""Exact dedup (content hash) and near dedup (MinHash + LSH banding).

MinHash (Broder 1997) estimates the Jaccard similarity of two documents' word 5-gram sets by the
fraction of equal signature entries; LSH banding (Leskovec, Rajaraman, Ullman, "Mining of Massive
Datasets", ch. 3) finds candidate pairs without comparing all pairs: the signature is cut into
`num_bands` bands and documents sharing any whole band become candidates, which are then kept only
if their estimated similarity reaches `near_threshold`. Hashes are crc32 + fixed multipliers from a
seeded PCG64, never Python's salted `hash`, so signatures are the same on every machine.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raymoe.config import require

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"

_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio multiplier: spreads n-gram sums over 64 bits
_CHUNK = 8192  # shingles per step, bounds memory at num_perm * _CHUNK * 8 bytes


@dataclass(kw_only=True)
class DedupConfig:
    """Exact and near-duplicate removal; the first document in input order is the one kept."""

    exact: bool = True
    near: bool = True
    ngram: int = 5
    num_perm: int = 128
    num_bands: int = 16
    near_threshold: float = 0.8
    seed: int = 1

    def __post_init__(self) -> None:
        require(self.ngram >= 1, f"dedup.ngram must be >= 1, got {self.ngram}")
        require(
            self.num_perm > 0 and self.num_bands > 0 and self.num_perm % self.num_bands == 0,
            f"dedup.num_bands={self.num_bands} must divide dedup.num_perm={self.num_perm}",
        )
        require(
            0.0 < self.near_threshold <= 1.0,
            f"dedup.near_threshold must be in (0, 1], got {self.near_threshold}",
        )


def content_hash(text: str) -> str:
    """Hex SHA-256 of the UTF-8 text: equal iff the normalised documents are equal."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _permutations(cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    a = rng.integers(1, 2**63, size=cfg.num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=cfg.num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """64-bit hashes of the document's lower-cased word n-grams (uint64, one per position)."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(1, dtype=np.uint64)
    w = np.fromiter((zlib.crc32(x.encode()) for x in words), dtype=np.uint64, count=len(words))
    n = min(ngram, len(w))
    h = np.zeros(len(w) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # polynomial hash of each window; uint64 arithmetic wraps mod 2**64
            h = h * _MIX + w[j : len(w) - n + 1 + j]
    return np.unique(h)


def minhash_signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """MinHash signature: for each of `num_perm` hash functions, the minimum over shingles.

    Returns:
        uint32 array of shape (num_perm,).
    """
    a, b = _permutations(cfg)
    sig = np.full(cfg.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
    hashes = shingle_hashes(text, cfg.ngram)
    with np.errstate(over="ignore"):
        for start in range(0, len(hashes), _CHUNK):
            h = hashes[start : start + _CHUNK]
            # Multiply-add mod 2**64, keep the high 32 bits (the well-mixed ones).
            perm = ((a[:, None] * h[None, :] + b[:, None]) >> np.uint64(32)).astype(np.uint32)
            sig = np.minimum(sig, perm.min(axis=1))
    return sig


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal MinHash entries, an unbiased estimate of Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def find_duplicates(
    hashes: Sequence[str], signatures: Sequence[np.ndarray | None], cfg: DedupConfig
) -> list[str]:
    """Marks every document that repeats an earlier kept one.

    Args:
        hashes: `content_hash` of each document, in priority order (first wins).
        signatures: `minhash_signature` of each document (None when near dedup is off).
        cfg: dedup settings.

    Returns:
        Per document: "" (kept), `exact_duplicate` or `near_duplicate`.
    """
    rows = cfg.num_perm // cfg.num_bands
    seen_hashes: set[str] = set()
    buckets: dict[bytes, list[int]] = {}
    out: list[str] = []
    for i, (h, sig) in enumerate(zip(hashes, signatures, strict=True)):
        if cfg.exact and h in seen_hashes:
            out.append(EXACT_DUPLICATE)
            continue
        keys: list[bytes] = []
        if cfg.near and sig is not None:
            keys = [bytes([band]) + sig[band * rows : (band + 1) * rows].tobytes()
                    for band in range(cfg.num_bands)]
            candidates = {j for key in keys for j in buckets.get(key, ())}
            if any(estimated_jaccard(sig, signatures[j]) >= cfg.near_threshold
                   for j in sorted(candidates)):
                out.append(NEAR_DUPLICATE)
                continue
        out.append("")
        seen_hashes.add(h)
        for key in keys:
            buckets.setdefault(key, []).append(i)
    return out
