"""Robust aggregation: median, trimmed mean and (multi-)Krum on hand-made cases, then five silos with
one Byzantine among them."""

import pytest
import torch

from raymoe.federated import robust
from raymoe.federated.strategies import FedAvg, FedMedian, FedTrimmedAvg, Krum
from raymoe.federated.updates import REJECT_NON_FINITE, REJECT_NORM, ClientUpdate, filter_updates

COUNTS_SHAPE = (1, 2)


def _update(silo, params, num_examples=1) -> ClientUpdate:
    return ClientUpdate(
        silo=silo,
        params=params,
        num_examples=num_examples,
        tokens_per_expert_LE=torch.zeros(COUNTS_SHAPE, dtype=torch.int64),
    )


def _updates(values, num_examples=None):
    """One silo per value; param "x" holds that value, "y" two zeros (so flattening is exercised)."""
    num_examples = num_examples or [1] * len(values)
    return [
        _update(f"s{i}", {"x": torch.tensor([v]), "y": torch.zeros(2)}, n)
        for i, (v, n) in enumerate(zip(values, num_examples))
    ]


GLOBAL = {"x": torch.zeros(1), "y": torch.zeros(2)}


def test_median_odd_count_is_the_middle_value():
    # Coordinates (1, 10, 2) -> sorted 1, 2, 10 -> 2; (-1, -1, 5) -> -1.
    flats = [torch.tensor([1.0, -1.0]), torch.tensor([10.0, -1.0]), torch.tensor([2.0, 5.0])]
    assert robust.coordinate_median(flats).tolist() == [2.0, -1.0]


def test_median_even_count_averages_the_two_middle_values_like_numpy():
    # (1, 10, 2, 4) -> sorted 1, 2, 4, 10 -> (2 + 4) / 2 = 3; torch.median would say 2.
    # (0, 0, 1, 1) -> (0 + 1) / 2 = 0.5.
    updates = [
        _update(f"s{i}", {"x": torch.tensor([a, b])})
        for i, (a, b) in enumerate([(1.0, 0.0), (10.0, 0.0), (2.0, 1.0), (4.0, 1.0)])
    ]
    out = FedMedian().aggregate_fit(1, {"x": torch.zeros(2)}, updates)
    assert out["x"].tolist() == [3.0, 0.5]


def test_trimmed_mean_cuts_one_low_and_one_high_per_coordinate():
    # beta 0.2 of 5 clients: int(0.2 * 5) = 1 value cut from each end, independently per coordinate.
    # Coordinate 0: (1, 2, 3, 4, 100) -> drop 1 and 100 -> (2 + 3 + 4) / 3 = 3.
    # Coordinate 1: (-50, 0, 1, 2, 3) -> drop -50 and 3 -> (0 + 1 + 2) / 3 = 1.
    pairs = [(1.0, 3.0), (100.0, -50.0), (2.0, 0.0), (3.0, 1.0), (4.0, 2.0)]
    updates = [_update(f"s{i}", {"x": torch.tensor(p)}) for i, p in enumerate(pairs)]
    out = FedTrimmedAvg(beta=0.2).aggregate_fit(1, {"x": torch.zeros(2)}, updates)
    torch.testing.assert_close(out["x"], torch.tensor([3.0, 1.0]))


# Five 1-D points; f = 1 malicious, so each score sums the n - f - 2 = 2 nearest squared distances.
#   a=0:   to b 1, c 6.25, d 16, e 400        -> 1 + 6.25    = 7.25
#   b=1:   to a 1, c 2.25, d 9, e 361         -> 1 + 2.25    = 3.25
#   c=2.5: to a 6.25, b 2.25, d 2.25, e 306.25 -> 2.25 + 2.25 = 4.5
#   d=4:   to a 16, b 9, c 2.25, e 256        -> 2.25 + 9    = 11.25
#   e=20:  to a 400, b 361, c 306.25, d 256   -> 256 + 306.25 = 562.25
KRUM_POINTS = [0.0, 1.0, 2.5, 4.0, 20.0]


def test_krum_scores_by_hand():
    flats = [torch.tensor([v, 0.0]) for v in KRUM_POINTS]
    assert robust.krum_scores(flats, num_malicious=1).tolist() == [7.25, 3.25, 4.5, 11.25, 562.25]


def test_krum_returns_the_lowest_score_client():
    updates = _updates(KRUM_POINTS)
    out = Krum(num_malicious_clients=1).aggregate_fit(1, GLOBAL, updates)
    # b (score 3.25) is returned as sent.
    assert torch.equal(out["x"], torch.tensor([1.0]))


def test_multi_krum_averages_the_best_by_num_examples():
    # Best three scores: b 3.25, c 4.5, a 7.25. With num_examples a=1, b=2, c=1:
    # (0 * 1 + 1 * 2 + 2.5 * 1) / (1 + 2 + 1) = 4.5 / 4 = 1.125.
    updates = _updates(KRUM_POINTS, num_examples=[1, 2, 1, 1, 1])
    assert robust.krum_select([torch.tensor([v]) for v in KRUM_POINTS], 1, 3) == [1, 2, 0]
    out = Krum(num_malicious_clients=1, num_clients_to_keep=3).aggregate_fit(1, GLOBAL, updates)
    torch.testing.assert_close(out["x"], torch.tensor([1.125]))


# ---- Five silos, one Byzantine ---------------------------------------------------------------
# Honest silo i sends global + delta + noise_i with delta = 0.1 everywhere and noise_i uniform in
# [-0.01, 0.01], so per coordinate the four honest values lie within 0.02 of each other, and so does
# their mean (honest FedAvg). Bound: with one attacker among five,
# - the median is the 3rd of 5 sorted values, so it lies between the 2nd and 3rd honest values;
# - the trimmed mean (cut 1 each end) averages the 2nd..4th of 5 sorted values, and removing one
#   value shifts an order statistic by at most one place, so each lies between honest values;
# - Krum (f=1) keeps honest updates only: the attacker is far from everyone.
# (A NaN attacker is rejected by filter_updates, leaving four honest values.) Each result is thus
# inside the honest range, within 0.02 of honest FedAvg per coordinate; 1e-6 covers float32 rounding.
BOUND = 0.02 + 1e-6
NUM_PARAMS = 64  # 2 tensors, 48 + 16 values


def _byzantine_round(attack: str):
    gen = torch.Generator().manual_seed(0)
    global_params = {"a": torch.zeros(6, 8), "b": torch.ones(16)}
    honest = []
    for i in range(4):
        params = {k: t + 0.1 + (torch.rand(t.shape, generator=gen) * 0.02 - 0.01) for k, t in global_params.items()}
        honest.append(_update(f"honest{i}", params))
    would_be = {k: t + 0.1 for k, t in global_params.items()}
    if attack == "scaled":  # the honest-looking delta, times 100
        bad = {k: global_params[k] + 100 * (would_be[k] - global_params[k]) for k in global_params}
    else:
        bad = {k: torch.full_like(t, float("nan")) for k, t in global_params.items()}
    updates = [*honest[:2], _update("byzantine", bad), *honest[2:]]  # not last, so order does not help
    honest_avg = FedAvg().aggregate_fit(1, global_params, honest)
    return global_params, updates, honest_avg


@pytest.mark.parametrize("attack", ["scaled", "nan"])
@pytest.mark.parametrize(
    "strategy",
    [
        FedMedian(),
        FedTrimmedAvg(beta=0.2),
        Krum(num_malicious_clients=1),
        Krum(num_malicious_clients=1, num_clients_to_keep=3),
    ],
    ids=["median", "trimmed_mean", "krum", "multi_krum"],
)
def test_robust_strategies_stay_near_honest_fedavg(strategy, attack):
    # Prepare: the server always filters first; without a norm bound only NaN is caught there.
    global_params, updates, honest_avg = _byzantine_round(attack)
    accepted, rejected = filter_updates(updates, global_params, None, COUNTS_SHAPE)
    assert rejected == ({} if attack == "scaled" else {REJECT_NON_FINITE: ["byzantine"]})
    # Execute
    out = strategy.aggregate_fit(1, global_params, accepted)
    # Assert
    for k in global_params:
        assert (out[k] - honest_avg[k]).abs().max() <= BOUND


def test_plain_fedavg_is_dragged_by_the_scaled_attacker():
    # Without filtering, the attacker's delta 100 * 0.1 = 10 enters a mean of five: about
    # (4 * 0.1 + 10) / 5 = 2.08 instead of 0.1, i.e. ~2 off; far outside BOUND.
    global_params, updates, honest_avg = _byzantine_round("scaled")
    out = FedAvg().aggregate_fit(1, global_params, updates)
    assert (out["a"] - honest_avg["a"]).abs().min() > 1.9


@pytest.mark.parametrize("attack", ["scaled", "nan"])
def test_fedavg_with_norm_bound_rejects_the_attacker(attack):
    # Honest delta norm: at most sqrt(64) * 0.11 = 0.88; the scaled one at least
    # 100 * sqrt(64) * 0.1 = 80. A bound of 2 separates them.
    global_params, updates, honest_avg = _byzantine_round(attack)
    accepted, rejected = filter_updates(updates, global_params, 2.0, COUNTS_SHAPE)
    assert rejected == {REJECT_NORM if attack == "scaled" else REJECT_NON_FINITE: ["byzantine"]}
    out = FedAvg().aggregate_fit(1, global_params, accepted)
    for k in global_params:
        torch.testing.assert_close(out[k], honest_avg[k])
