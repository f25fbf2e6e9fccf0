r"""Exact dedup (content hash) and near dedup (MinHash + LSH banding).

MinHash (Broder 1997) estimates the Jaccard similarity of two documents' word 5-gram sets by the
fraction of equal signature entries; LSH banding (Leskovec, Rajaraman, Ullman, "Mining of Massive
Datasets", ch. 3) finds candidate pairs without comparing all pairs: the signature is cut into
`num_bands` bands and documents sharing any whole band become candidates, which are then kept only
if their estimated similarity reaches `near_threshold`. Hashes are fixed polynomials and
multipliers from a seeded PCG64, never Python's salted `hash`, so signatures are the same on every
machine.

Fingerprinting is vectorised with numpy, with no Python work per word or per shingle: the
lower-cased text becomes an array of code points, word characters (exactly the regex `\w`) are
found with a lookup table, each word is hashed as a polynomial of its code points (all words at
once, from prefix sums) finished with SplitMix64 (Steele et al. 2014), and the permutations are one
(num_perm x shingles) multiply-add transform reduced with a min per row.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raymoe.config import require

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"

_NON_WORD = re.compile(r"\W")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio multiplier: spreads n-gram sums over 64 bits
# Shingles per step: a (num_perm x _CHUNK) uint64 block (1 MiB at 128 permutations) stays in cache.
_CHUNK = 1024
_BASE = 0x100000001B3  # odd (the 64-bit FNV prime), so it has an inverse modulo 2**64
_BASE_INV = pow(_BASE, -1, 2**64)
_TABLE_STEP = 0x10000  # the word table grows in blocks of code points, as texts need them


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


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


class _Tables:
    """Per-process lookup tables, grown on demand: is-word-char by code point, and powers of
    `_BASE` and its inverse (uint64, wrapping) by position."""

    is_word: np.ndarray = np.zeros(0, dtype=bool)
    powers: np.ndarray = np.ones(1, dtype=np.uint64)
    inv_powers: np.ndarray = np.ones(1, dtype=np.uint64)


def _word_table(size: int) -> np.ndarray:
    """`is_word[c]` for code points c < size: True iff chr(c) matches `\\w` (built with the same
    regex engine, so it agrees with `re` on every code point, Unicode included)."""
    have = len(_Tables.is_word)
    if size > have:
        new = min(0x110000, -(-size // _TABLE_STEP) * _TABLE_STEP)
        chars = "".join(map(chr, range(have, new)))
        marked = _NON_WORD.sub("\0", chars).encode("utf-32-le", "surrogatepass")
        _Tables.is_word = np.concatenate([_Tables.is_word, np.frombuffer(marked, dtype=np.uint32) != 0])
    return _Tables.is_word


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(_BASE**i, _BASE_INV**i) mod 2**64 for i < n."""
    if n > len(_Tables.powers):
        size = max(n, 2 * len(_Tables.powers))
        with np.errstate(over="ignore"):  # uint64 products wrap mod 2**64, as intended
            _Tables.powers = np.cumprod(np.full(size, _BASE, dtype=np.uint64)) * np.uint64(_BASE_INV)
            _Tables.inv_powers = np.cumprod(np.full(size, _BASE_INV, dtype=np.uint64)) * np.uint64(_BASE)
    return _Tables.powers[:n], _Tables.inv_powers[:n]


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit affects every output bit."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def word_hashes(text: str) -> np.ndarray:
    """64-bit hashes of the lower-cased words (runs of `\\w`) of `text`, in order (uint64).

    Word [s, e) hashes to sum_j c_j * B**(e-1-j) mod 2**64 over its code points c_j; with
    Q = cumsum(c_j * B**-j) that is B**(e-1) * (Q[e-1] - Q[s-1]), one gather for all words.
    """
    cp = np.frombuffer(text.lower().encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    if not len(cp):
        return np.zeros(0, dtype=np.uint64)
    mask = _word_table(int(cp.max()) + 1)[cp]
    edges = np.flatnonzero(np.diff(mask, prepend=False, append=False))
    starts, ends = edges[0::2], edges[1::2]
    if not len(starts):
        return np.zeros(0, dtype=np.uint64)
    powers, inv_powers = _power_tables(len(cp))
    with np.errstate(over="ignore"):
        prefix = np.cumsum(cp.astype(np.uint64) * inv_powers, dtype=np.uint64)
        before = np.where(starts > 0, prefix[starts - 1], np.uint64(0))
        h = powers[ends - 1] * (prefix[ends - 1] - before)
        # The length goes in too: words of different lengths differ even where their
        # polynomials collide.
        h ^= (ends - starts).astype(np.uint64) << np.uint64(56)
    return _splitmix64(h)


def _window_hashes(text: str, ngram: int) -> np.ndarray:
    """One 64-bit hash per word n-gram position (repeats included)."""
    w = word_hashes(text)
    if not len(w):
        return np.zeros(1, dtype=np.uint64)
    n = min(ngram, len(w))
    h = np.zeros(len(w) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # polynomial hash of each window; uint64 arithmetic wraps mod 2**64
            h = h * _MIX + w[j : len(w) - n + 1 + j]
    return h


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Sorted distinct 64-bit hashes of the document's lower-cased word n-grams (uint64)."""
    return np.unique(_window_hashes(text, ngram))


def minhash_signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """MinHash signature: for each of `num_perm` hash functions, the minimum over shingles.

    Returns:
        uint32 array of shape (num_perm,).
    """
    a, b = _permutations(cfg.num_perm, cfg.seed)
    a_col, b_col = a[:, None], b[:, None]
    # Repeated shingles cannot change a minimum, so they are not removed first (np.unique would
    # cost more than the extra columns).
    hashes = _window_hashes(text, cfg.ngram)
    sig = np.full(cfg.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    buf = np.empty((cfg.num_perm, min(_CHUNK, len(hashes))), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(hashes), _CHUNK):
            h = hashes[None, start : start + _CHUNK]
            out = buf[:, : h.shape[1]]
            np.multiply(a_col, h, out=out)  # multiply-add mod 2**64
            out += b_col
            np.minimum(sig, out.min(axis=1), out=sig)
    # Keep the high 32 bits (the well-mixed ones). x -> x >> 32 is monotone, so the minimum's
    # high bits are the minimum of the high bits: one shift per permutation, not per shingle.
    return (sig >> np.uint64(32)).astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal MinHash entries, an unbiased estimate of Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def find_duplicates(hashes: Sequence[str], signatures: Sequence[np.ndarray | None], cfg: DedupConfig) -> list[str]:
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
            keys = [bytes([band]) + sig[band * rows : (band + 1) * rows].tobytes() for band in range(cfg.num_bands)]
            candidates = {j for key in keys for j in buckets.get(key, ())}
            # A bucket holds only documents that have a signature.
            others = (signatures[j] for j in sorted(candidates))
            if any(other is not None and estimated_jaccard(sig, other) >= cfg.near_threshold for other in others):
                out.append(NEAR_DUPLICATE)
                continue
        out.append("")
        seen_hashes.add(h)
        for key in keys:
            buckets.setdefault(key, []).append(i)
    return out
