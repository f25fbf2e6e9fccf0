"""DP for federated updates: clipping, noise placement, the silo-level accountant, config checks."""

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy import optimize, stats

from raymoe.federated.privacy import (
    PrivacyAccountant,
    clip_to_norm,
    gaussian_noise,
    noise_std,
    noisy_mean,
    privatize_update,
    silo_sample_rate,
    validate_privacy_config,
)


def test_clip_scales_down_to_the_bound_hand_worked():
    # Prepare: ||(3, 4)|| = 5, C = 1 -> scale 1/5.
    # Execute
    clipped, norm = clip_to_norm(torch.tensor([3.0, 4.0]), 1.0)
    # Assert
    assert norm == 5.0
    assert torch.allclose(clipped, torch.tensor([0.6, 0.8]), rtol=0, atol=1e-7)


def test_clip_leaves_updates_inside_the_bound_unchanged():
    # Prepare
    inside = torch.tensor([0.3, 0.4])
    # Execute
    clipped, norm = clip_to_norm(inside, 1.0)
    zero_clipped, zero_norm = clip_to_norm(torch.zeros(3), 1.0)
    # Assert
    assert torch.equal(clipped, inside) and norm == pytest.approx(0.5)
    assert torch.equal(zero_clipped, torch.zeros(3)) and zero_norm == 0.0


def test_noise_std_per_party_hand_worked():
    # z = 1.2, C = 0.5: z*C = 0.6 centrally; 0.6 / sqrt(4) = 0.3 for each of 4 silos.
    assert noise_std("central", 1.2, 0.5, 4) == pytest.approx(0.6)
    assert noise_std("distributed", 1.2, 0.5, 4) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="noise mode"):
        noise_std("local", 1.2, 0.5, 4)


def _variance_ci(samples: torch.Tensor, confidence: float) -> tuple[float, float]:
    # (m - 1) s^2 / sigma^2 ~ chi2(m - 1) for m Gaussian draws; invert it for sigma^2.
    m = samples.numel()
    s2 = float(samples.double().var())
    tail = (1.0 - confidence) / 2.0
    return ((m - 1) * s2 / stats.chi2.ppf(1.0 - tail, m - 1), (m - 1) * s2 / stats.chi2.ppf(tail, m - 1))


def test_distributed_noise_sums_to_the_central_variance():
    # Prepare: 4 silos, z = 1.2, C = 0.5, 20000 draws of each silo's noise.
    n, z, c, draws = 4, 1.2, 0.5, 20_000
    gen = torch.Generator().manual_seed(0)
    per_party = noise_std("distributed", z, c, n)
    # Execute
    total = sum(gaussian_noise((draws,), per_party, gen) for _ in range(n))
    too_loud = sum(gaussian_noise((draws,), noise_std("central", z, c, n), gen) for _ in range(n))
    # Assert: (z*C)^2 = 0.36 lies in the 99.9% chi-square interval of the summed noise's variance,
    # the mean is within 3.3 standard errors of 0, and each silo adding the central std
    # (variance 4 * 0.36) is rejected by the same interval.
    low, high = _variance_ci(total, 0.999)
    assert low < (z * c) ** 2 < high
    assert abs(float(total.double().mean())) < 3.3 * z * c / math.sqrt(draws)
    low, high = _variance_ci(too_loud, 0.999)
    assert not low < (z * c) ** 2 < high


def test_privatize_update_distributed_adds_this_silos_share():
    # Prepare: (3, 4) clipped to C = 1 is (0.6, 0.8); 4 silos, z = 1.2 -> std 0.6 each.
    expected_noise = gaussian_noise((2,), 0.6, torch.Generator().manual_seed(3))
    # Execute
    sent, norm = privatize_update(
        torch.tensor([3.0, 4.0]),
        mode="distributed",
        noise_multiplier=1.2,
        clip_norm=1.0,
        num_participants=4,
        generator=torch.Generator().manual_seed(3),
    )
    central, _ = privatize_update(
        torch.tensor([3.0, 4.0]),
        mode="central",
        noise_multiplier=1.2,
        clip_norm=1.0,
        num_participants=4,
        generator=torch.Generator().manual_seed(3),
    )
    # Assert
    assert norm == 5.0
    assert torch.allclose(sent, torch.tensor([0.6, 0.8]) + expected_noise, atol=1e-6)
    assert torch.allclose(central, torch.tensor([0.6, 0.8]), atol=1e-7)


def test_noisy_mean_adds_noise_only_centrally():
    # Prepare: a sum over 4 silos; z = 2, C = 0.5 -> central std 1.0.
    update_sum = torch.tensor([4.0, -8.0, 2.0])
    expected_noise = gaussian_noise((3,), 1.0, torch.Generator().manual_seed(5))
    kwargs = dict(noise_multiplier=2.0, clip_norm=0.5, num_participants=4)
    # Execute
    central = noisy_mean(update_sum, mode="central", generator=torch.Generator().manual_seed(5), **kwargs)
    distributed = noisy_mean(update_sum, mode="distributed", generator=torch.Generator(), **kwargs)
    # Assert
    assert torch.allclose(central, (update_sum + expected_noise) / 4, atol=1e-6)
    assert torch.equal(distributed, torch.tensor([1.0, -2.0, 0.5]))


def _epsilon(z, q, rounds, delta=1e-5):
    accountant = PrivacyAccountant()
    for _ in range(rounds):
        accountant.step(z, q)
    return accountant.epsilon(delta)


def test_epsilon_moves_the_right_way():
    # Prepare / Execute
    base = _epsilon(1.0, 0.1, 50)
    # Assert: more noise -> less epsilon; more rounds or a larger sample rate -> more.
    assert _epsilon(2.0, 0.1, 50) < base
    assert _epsilon(1.0, 0.1, 100) > base
    assert _epsilon(1.0, 0.2, 50) > base
    assert PrivacyAccountant().epsilon(1e-5) == 0.0


def test_epsilon_equals_opacus_run_directly():
    # Prepare: 30 rounds with 10 of 100 silos, then 10 rounds with 20 of 100, z = 1.1.
    ours, reference = PrivacyAccountant(), RDPAccountant()
    schedule = [(silo_sample_rate(10, 100), 30), (silo_sample_rate(20, 100), 10)]
    # Execute
    for q, rounds in schedule:
        for _ in range(rounds):
            ours.step(1.1, q)
            reference.step(noise_multiplier=1.1, sample_rate=q)
    # Assert
    assert [q for q, _ in schedule] == [0.1, 0.2]
    assert ours.num_rounds == 40
    assert ours.epsilon(1e-5) == reference.get_epsilon(delta=1e-5)


def test_full_participation_is_close_to_the_exact_gaussian_epsilon():
    # Prepare: q = 1, T = 100 rounds, z = 5. T Gaussian mechanisms of sensitivity 1 and std z
    # compose exactly into one with mu = sqrt(T) / z = 2 (Dong, Roth, Su 2019), whose exact
    # delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle & Wang 2018, Thm 8).
    mu, delta = math.sqrt(100) / 5.0, 1e-5
    exact = optimize.brentq(
        lambda e: stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2) - delta, 1e-6, 100
    )
    # Execute
    rdp = _epsilon(5.0, 1.0, 100, delta)
    # Assert: RDP is an upper bound, and for this mechanism a tight one (within 15%).
    assert exact <= rdp <= 1.15 * exact


def test_state_round_trip_reports_the_same_epsilon():
    # Prepare: 25 rounds, checkpointed through JSON, then 5 more on both copies.
    original = PrivacyAccountant()
    for _ in range(25):
        original.step(1.3, 0.05)
    resumed = PrivacyAccountant()
    # Execute
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    at_checkpoint = resumed.epsilon(1e-6)
    for accountant in (original, resumed):
        for _ in range(5):
            accountant.step(1.3, 0.05)
    # Assert
    assert at_checkpoint == _epsilon(1.3, 0.05, 25, 1e-6)
    assert resumed.epsilon(1e-6) == original.epsilon(1e-6) == _epsilon(1.3, 0.05, 30, 1e-6)
    assert resumed.state_dict() == original.state_dict() == {"mechanism": "rdp", "history": [[1.3, 0.05, 30]]}
    with pytest.raises(ValueError, match="'prv'"):
        resumed.load_state_dict({"mechanism": "prv", "history": []})


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(noise_multiplier=0.0), "privacy.noise_multiplier"),
        (dict(noise_multiplier=float("nan")), "privacy.noise_multiplier"),
        (dict(noise_multiplier="1.0"), "privacy.noise_multiplier"),
        (dict(noise_multiplier=True), "privacy.noise_multiplier"),
        (dict(clip_norm=-1.0), "privacy.clip_norm"),
        (dict(delta=0.0), "privacy.delta"),
        (dict(delta=1.0), "privacy.delta"),
        (dict(target_epsilon=0.0), "privacy.target_epsilon"),
        (dict(target_epsilon=float("inf")), "privacy.target_epsilon"),
    ],
)
def test_bad_privacy_config_names_the_key(kwargs, key):
    # Prepare
    good = dict(noise_multiplier=1.0, clip_norm=0.1, delta=1e-5, target_epsilon=None)
    # Execute / Assert
    with pytest.raises(ValueError, match=key):
        validate_privacy_config(**{**good, **kwargs})
    validate_privacy_config(**good)
    validate_privacy_config(**{**good, "target_epsilon": 8.0})
