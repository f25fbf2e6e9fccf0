"""Secure aggregation: masks cancel, a lone masked vector looks uniform, dropouts abort cleanly."""

import hashlib
import math

import numpy as np
import pytest
from scipy import stats

from raymoe.federated.secure_aggregation import (
    DEFAULT_FRAC_BITS,
    SecureAggregationAborted,
    SecureAggregationRound,
    SiloKeys,
    decode_fixed_point,
    encode_fixed_point,
    mask_from_seed,
    mask_vector,
    max_abs_value,
    pairwise_seed,
    unmask_sum,
)

LSB = 2.0**-DEFAULT_FRAC_BITS


def _keys(ids, salt="attempt-1"):
    # Deterministic X25519 keys so every statistic below is a fixed, reproducible number.
    return {i: SiloKeys.from_private_bytes(hashlib.sha256(f"{salt}/{i}".encode()).digest()) for i in ids}


def _mask_all(values, keys, round):
    public = {i: k.public_bytes for i, k in keys.items()}
    return {i: mask_vector(values[i], i, keys[i].private_key, public, round) for i in values}


def test_fixed_point_is_twos_complement_hand_worked():
    # Prepare: -1.5 * 2^24 = -25165824, stored mod 2^64; 2.25 * 2^24 = 37748736.
    # Execute
    enc = encode_fixed_point(np.array([-1.5, 2.25]), num_parties=2)
    total = decode_fixed_point(enc[:1] + enc[1:])  # array adds wrap mod 2^64 silently
    # Assert
    assert int(enc[0]) == 2**64 - 25165824 and int(enc[1]) == 37748736
    assert total.tolist() == [0.75]


@pytest.mark.parametrize("num_silos", [3, 4, 5])
def test_unmasked_sum_equals_float_sum(num_silos):
    # Prepare: a few thousand values per silo, about half negative.
    ids = [f"silo-{k}" for k in range(num_silos)]
    rng = np.random.default_rng(num_silos)
    values = {i: rng.normal(0.0, 5.0, size=3000) for i in ids}
    assert all((v < 0).sum() > 1000 for v in values.values())
    # Execute
    result = unmask_sum(_mask_all(values, _keys(ids), round=3), ids)
    # Assert: each value is rounded by at most half an LSB, so n of them by n/2 LSB < n LSB.
    expected = np.sum([values[i] for i in ids], axis=0)
    assert np.max(np.abs(result - expected)) <= num_silos * LSB


def test_masks_follow_the_sign_convention_and_cancel_exactly():
    # Prepare: zero updates, so each masked vector is only its masks.
    ids = ["a", "b", "c"]
    keys = _keys(ids)
    zeros = {i: np.zeros(2000) for i in ids}
    # Execute
    masked = _mask_all(zeros, keys, round=5)
    seed_ab = pairwise_seed(keys["a"].private_key, keys["b"].public_bytes, round=5, silo_id="a", peer_id="b")
    seed_ac = pairwise_seed(keys["a"].private_key, keys["c"].public_bytes, round=5, silo_id="a", peer_id="c")
    # Assert: "a" is the smaller id of both its pairs, so it adds m_ab + m_ac ...
    assert np.array_equal(masked["a"], mask_from_seed(seed_ab, 2000) + mask_from_seed(seed_ac, 2000))
    # ... and the three vectors sum to exactly 0 mod 2^64 although none of them is 0.
    assert all(np.count_nonzero(m) > 1990 for m in masked.values())
    assert not np.any(masked["a"] + masked["b"] + masked["c"])


def test_both_sides_derive_the_seed_and_rounds_differ():
    # Prepare
    keys = _keys(["a", "b"])
    # Execute
    a_side = pairwise_seed(keys["a"].private_key, keys["b"].public_bytes, round=1, silo_id="a", peer_id="b")
    b_side = pairwise_seed(keys["b"].private_key, keys["a"].public_bytes, round=1, silo_id="b", peer_id="a")
    next_round = pairwise_seed(keys["a"].private_key, keys["b"].public_bytes, round=2, silo_id="a", peer_id="b")
    # Assert: equal seeds on both sides; a new round gives a new seed and unrelated masks
    # (two independent uniform uint64 vectors agree nowhere, barring a 1000 * 2^-64 chance).
    assert len(a_side) == 32 and a_side == b_side
    assert next_round != a_side
    assert not np.any(mask_from_seed(a_side, 1000) == mask_from_seed(next_round, 1000))


def _uniformity_and_correlation(vector_u64, values):
    u = vector_u64.astype(np.float64) / 2.0**64
    return (stats.kstest(u, "uniform").pvalue, stats.pearsonr(u, values)[0], stats.spearmanr(u, values)[0])


def test_one_masked_vector_looks_uniform_and_uncorrelated():
    # Prepare: silo "b" of three; 4000 standard-normal values.
    # If the masked vector is independent of the values, sqrt(N) * r is about N(0, 1), so
    # |r| < 4 / sqrt(N) = 0.063 fails by chance with probability ~6e-5.
    ids = ["a", "b", "c"]
    values = {i: np.random.default_rng(k).normal(size=4000) for k, i in enumerate(ids)}
    bound = 4.0 / math.sqrt(4000)
    # Execute
    masked = _mask_all(values, _keys(ids), round=1)["b"]
    ks_p, pearson, spearman = _uniformity_and_correlation(masked, values["b"])
    # Assert
    assert ks_p > 1e-3
    assert abs(pearson) < bound and abs(spearman) < bound


def test_the_same_checks_reject_an_unmasked_encoded_vector():
    # Prepare: the encoded but unmasked vector of the same silo (proves the checks can fail).
    values = np.random.default_rng(1).normal(size=4000)
    bound = 4.0 / math.sqrt(4000)
    # Execute
    ks_p, pearson, spearman = _uniformity_and_correlation(encode_fixed_point(values, 3), values)
    # Assert: small positives sit near 0 and negatives near 2^64, far from uniform.
    assert ks_p < 1e-3
    assert abs(pearson) > bound and abs(spearman) > bound


def _round_trip(round_no, ids, values, keys, answering):
    server = SecureAggregationRound(round_no, ids)
    for i in ids:
        server.register_public_key(i, keys[i].public_bytes)
    for i in answering:
        masked = mask_vector(values[i], i, keys[i].private_key, server.peer_keys(i), round_no)
        server.submit(i, masked)
    return server.aggregate()


def test_dropout_aborts_then_survivors_retry_with_fresh_keys():
    # Prepare: four silos get keys, "c" never returns its masked vector.
    ids = ["a", "b", "c", "d"]
    rng = np.random.default_rng(7)
    values = {i: rng.uniform(-3.0, 3.0, size=2500) for i in ids}
    # Execute
    with pytest.raises(SecureAggregationAborted) as aborted:
        _round_trip(9, ids, values, _keys(ids), answering=["a", "b", "d"])
    survivors = aborted.value.survivors
    result = _round_trip(9, survivors, values, _keys(survivors, salt="attempt-2"), survivors)
    # Assert
    assert aborted.value.missing == ["c"] and "'c'" in str(aborted.value)
    assert survivors == ["a", "b", "d"]
    expected = values["a"] + values["b"] + values["d"]
    assert np.max(np.abs(result - expected)) <= 3 * LSB


def test_a_silo_that_never_sent_its_key_aborts_before_masking():
    # Prepare
    server = SecureAggregationRound(1, ["a", "b", "c"])
    keys = _keys(["a", "b"])
    for i, k in keys.items():
        server.register_public_key(i, k.public_bytes)
    # Execute / Assert
    with pytest.raises(SecureAggregationAborted) as aborted:
        server.peer_keys("a")
    assert aborted.value.missing == ["c"] and aborted.value.survivors == ["a", "b"]


def test_server_api_never_yields_an_individual_update():
    # Prepare
    server = SecureAggregationRound(1, ["a", "b"])
    # Execute / Assert: no round of one, no outsiders, no second submission.
    with pytest.raises(ValueError, match=">= 2 participants"):
        SecureAggregationRound(1, ["a"])
    with pytest.raises(ValueError, match="not a participant"):
        server.submit("mallory", np.zeros(3, dtype=np.uint64))
    server.submit("a", np.zeros(3, dtype=np.uint64))
    with pytest.raises(ValueError, match="already submitted"):
        server.submit("a", np.zeros(3, dtype=np.uint64))
    with pytest.raises(SecureAggregationAborted):
        server.aggregate()


def test_values_outside_the_safe_range_raise():
    # Prepare: three parties at 24 fraction bits may each send |x| < 2^38 / 3.
    bound = max_abs_value(3, DEFAULT_FRAC_BITS)
    assert bound == 2.0**38 / 3
    keys = _keys(["a", "b", "c"])
    public = {i: k.public_bytes for i, k in keys.items()}
    near = np.array([0.999 * bound, -0.999 * bound])
    # Execute: just inside the range three parties' sum still decodes.
    total = unmask_sum(_mask_all(dict.fromkeys(keys, near), keys, round=1), ["a", "b", "c"])
    # Assert
    assert np.allclose(total, 3 * near, rtol=0, atol=3 * LSB)
    for bad in (bound, -2 * bound, np.nan, np.inf):
        with pytest.raises(ValueError, match="outside the secure-aggregation range"):
            mask_vector(np.array([0.0, bad]), "a", keys["a"].private_key, public, round=1)
