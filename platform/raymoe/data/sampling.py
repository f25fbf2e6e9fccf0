"""Deterministic per-document choices: train/validation split, mixing repeats, shuffle order.

Each choice is a function of the document's content hash and a seed only, so it does not depend
on how many workers ran, in which order files were listed or whether the run was resumed.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def unit_interval(key: str, seed: int, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (key, seed, salt)."""
    digest = hashlib.blake2b(f"{salt}:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_split(doc_hash: str, val_fraction: float, seed: int) -> str:
    """ "val" for a `val_fraction` share of documents (chosen by hash), else "train"."""
    return "val" if unit_interval(doc_hash, seed, "split") < val_fraction else "train"


def mix_repeats(doc_hash: str, weight: float, seed: int) -> int:
    """How many copies of a document the training mix gets for a source weight.

    floor(weight) copies always, plus one more with probability frac(weight) (chosen by hash), so
    the expected count is exactly `weight`: 2.0 -> 2, 0.5 -> 0 or 1, 1.0 -> 1.
    """
    whole = math.floor(weight)
    extra = 1 if unit_interval(doc_hash, seed, "mix") < weight - whole else 0
    return whole + extra


def shuffled(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) (PCG64: the same on every platform)."""
    return np.random.default_rng(seed).permutation(n)
