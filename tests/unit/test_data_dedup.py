"""Exact and near dedup."""

import random
import re

import numpy as np
import pytest

from raymoe.config import ConfigError
from raymoe.data.dedup import (
    DedupConfig,
    content_hash,
    estimated_jaccard,
    find_duplicates,
    minhash_signature,
    shingle_hashes,
    word_hashes,
)

CFG = DedupConfig()


def _words(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [f"w{rng.randrange(10**6)}" for _ in range(n)]


def test_content_hash_is_sha256_of_utf8():
    # Reference: sha256("abc") from FIPS 180-2 appendix B.1.
    assert content_hash("abc") == ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_shingles_are_word_5grams_case_insensitive():
    # 7 words -> 3 distinct 5-grams; case and punctuation do not matter.
    assert len(shingle_hashes("a b c d e f g", 5)) == 3
    assert np.array_equal(shingle_hashes("A, b. C d E!", 5), shingle_hashes("a b c d e", 5))
    # Fewer words than n: one shingle of all words.
    assert len(shingle_hashes("just two", 5)) == 1


def test_words_are_exactly_the_regex_words_unicode_included():
    # Prepare: the reference segmentation is Python's own `re` (\w+ on the lower-cased text),
    # over ASCII, accented Latin, Greek, CJK, digits from other scripts, underscores and symbols.
    text = "Straße_1 café ΣΟΦΙΑ σοφια 東京タワー ٣٤ x__y -- ¤§ naïve\tNAÏVE emoji🙂end a-b a.b a'b"
    words = re.findall(r"\w+", text.lower())
    # Execute
    hashes = word_hashes(text).tolist()
    # Assert: one hash per word, and equal hashes exactly for equal words.
    # 17 words: straße_1 café σοφια σοφια 東京タワー ٣٤ x__y naïve naïve emoji end
    # a b a b a b
    assert len(hashes) == len(words) == 17
    for i in range(len(words)):
        for j in range(len(words)):
            assert (hashes[i] == hashes[j]) == (words[i] == words[j]), (words[i], words[j])


def test_signature_is_min_of_high_bits_over_shingles():
    # Reference: sig[p] = min over distinct shingles h of ((a_p * h + b_p) mod 2**64) >> 32, the
    # multiply-shift family with the config's seeded (a, b), computed here in Python integers.
    cfg = DedupConfig(num_perm=8, num_bands=2)
    text = " ".join(_words(3, 40) * 2)  # repeated shingles must not matter
    rng = np.random.default_rng(cfg.seed)
    a = rng.integers(1, 2**63, size=cfg.num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=cfg.num_perm, dtype=np.uint64)
    shingles = [int(h) for h in shingle_hashes(text, cfg.ngram)]
    expected = [min(((int(a_p) * h + int(b_p)) % 2**64) >> 32 for h in shingles) for a_p, b_p in zip(a, b)]
    # Execute / Assert
    assert minhash_signature(text, cfg).tolist() == expected


def test_minhash_estimates_jaccard():
    # Prepare: two documents sharing the first 300 of 400 distinct words. Word 5-gram sets:
    # each has 396 shingles, 296 shared -> J = 296 / (396 + 396 - 296) = 296/496 = 0.597.
    base = _words(1, 300)
    a = " ".join(base + _words(2, 100))
    b = " ".join(base + _words(3, 100))
    # Execute
    est = estimated_jaccard(minhash_signature(a, CFG), minhash_signature(b, CFG))
    # Assert: 128 permutations give a standard error of sqrt(J(1-J)/128) ~ 0.043.
    assert est == pytest.approx(296 / 496, abs=0.15)
    assert estimated_jaccard(minhash_signature(a, CFG), minhash_signature(a, CFG)) == 1.0


def test_signature_is_deterministic_and_typed():
    sig = minhash_signature("the quick brown fox jumps over the lazy dog", CFG)
    assert sig.dtype == np.uint32 and sig.shape == (128,)
    assert np.array_equal(sig, minhash_signature("the quick brown fox jumps over the lazy dog", CFG))


def test_find_duplicates_keeps_first_in_order():
    # Prepare: doc0; doc1 == doc0; doc2 = doc0 with its last word changed (1 of 196 shingles
    # differs: J = 195/197); doc3 unrelated.
    words = _words(7, 200)
    docs = [" ".join(words), " ".join(words), " ".join([*words[:-1], "changed"]), " ".join(_words(8, 200))]
    hashes = [content_hash(d) for d in docs]
    sigs = [minhash_signature(d, CFG) for d in docs]
    # Execute / Assert
    assert find_duplicates(hashes, sigs, CFG) == ["", "exact_duplicate", "near_duplicate", ""]
    # With near dedup off only the exact copy goes.
    off = DedupConfig(near=False)
    assert find_duplicates(hashes, [None] * 4, off) == ["", "exact_duplicate", "", ""]


def test_near_duplicate_of_a_dropped_doc_is_compared_to_kept_docs_only():
    # doc1 is an exact copy of doc0 (dropped); doc2 is near doc0 -> still near duplicate.
    words = _words(9, 100)
    docs = [" ".join(words), " ".join(words), " ".join(words[1:])]
    sigs = [minhash_signature(d, CFG) for d in docs]
    out = find_duplicates([content_hash(d) for d in docs], sigs, CFG)
    assert out == ["", "exact_duplicate", "near_duplicate"]


def test_config_checks():
    with pytest.raises(ConfigError, match=r"dedup\.num_bands=5 must divide dedup\.num_perm=128"):
        DedupConfig(num_bands=5)
    with pytest.raises(ConfigError, match=r"dedup\.near_threshold"):
        DedupConfig(near_threshold=0.0)
