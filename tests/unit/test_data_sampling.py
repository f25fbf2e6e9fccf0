"""Split, mixing repeats and shuffle are deterministic functions of (hash, seed)."""

import numpy as np

from raymoe.data.sampling import assign_split, mix_repeats, shuffled, unit_interval

KEYS = [f"doc-{i}" for i in range(4000)]


def test_unit_interval_is_stable_and_in_range():
    values = [unit_interval(k, 0, "s") for k in KEYS]
    assert all(0.0 <= v < 1.0 for v in values)
    assert values == [unit_interval(k, 0, "s") for k in KEYS]
    assert values != [unit_interval(k, 1, "s") for k in KEYS]


def test_split_fraction():
    # 4000 documents at 10%: binomial sd = sqrt(4000 * .1 * .9) = 19, so 400 +- 100 is ~5 sd.
    val = sum(assign_split(k, 0.1, 0) == "val" for k in KEYS)
    assert 300 <= val <= 500
    assert all(assign_split(k, 0.0, 0) == "train" for k in KEYS)


def test_mix_repeats_expectation():
    assert {mix_repeats(k, 2.0, 0) for k in KEYS} == {2}
    assert {mix_repeats(k, 0.0, 0) for k in KEYS} == {0}
    # weight 1.5: 1 or 2 copies, mean 1.5 (sd of the mean 0.5/sqrt(4000) ~ 0.008).
    reps = [mix_repeats(k, 1.5, 0) for k in KEYS]
    assert set(reps) == {1, 2}
    assert abs(np.mean(reps) - 1.5) < 0.05


def test_shuffle_is_a_seeded_permutation():
    a = shuffled(100, 3)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, shuffled(100, 3))
    assert not np.array_equal(a, shuffled(100, 4))
