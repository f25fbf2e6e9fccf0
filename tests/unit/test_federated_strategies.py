"""Weighted-mean strategies worked by hand: FedAvg, MoE-aware weights, the sums used under secure
aggregation, FedAdam / FedYogi over two rounds, Flower's client sampling, and the builder."""

import io
import math

import numpy as np
import pytest
import torch

from raymoe.federated.strategies import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    NotEnoughSilos,
    build_strategy,
    sum_params,
    weighted_mean_from_sums,
    weighted_numerators,
)
from raymoe.federated.updates import ClientUpdate

ATTN = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _expert(layer: int, expert: int) -> str:
    return f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.lora_A.weight"


def _update(silo, params, num_examples, counts=((0, 0), (0, 0))) -> ClientUpdate:
    return ClientUpdate(
        silo=silo,
        params=params,
        num_examples=num_examples,
        tokens_per_expert_LE=torch.tensor(counts, dtype=torch.int64),
    )


def test_fedavg_is_the_num_examples_weighted_mean():
    # Prepare: weights 1, 2, 5 (total 8).
    updates = [
        _update("a", {"x": torch.tensor([8.0, 0.0])}, 1),
        _update("b", {"x": torch.tensor([4.0, 4.0])}, 2),
        _update("c", {"x": torch.tensor([0.0, 8.0])}, 5),
    ]
    # Execute
    out = FedAvg().aggregate_fit(1, {"x": torch.zeros(2)}, updates)
    # Assert: (1*8 + 2*4 + 5*0) / 8 = 16 / 8 = 2;  (1*0 + 2*4 + 5*8) / 8 = 48 / 8 = 6.
    assert out["x"].tolist() == [2.0, 6.0]


# Two layers x two experts. Silo a: 1 example, everything 1.0; silo b: 3 examples, random values
# (so "equals b exactly" means something). Global: everything 7.0.
#   tokens a: [[30, 0], [0, 5]]   tokens b: [[10, 20], [0, 15]]
def _moe_round():
    names = [ATTN, _expert(0, 0), _expert(0, 1), _expert(1, 0), _expert(1, 1)]
    global_params = {n: torch.full((2, 3), 7.0) for n in names}
    b_params = {n: torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(names)}
    a = _update("a", {n: torch.ones(2, 3) for n in names}, 1, counts=((30, 0), (0, 5)))
    b = _update("b", b_params, 3, counts=((10, 20), (0, 15)))
    return global_params, [a, b]


def test_moe_aware_weights_experts_by_routed_tokens():
    # Prepare
    global_params, (a, b) = _moe_round()
    # Execute
    out = FedAvg(moe_aware=True).aggregate_fit(1, global_params, [a, b])
    # Assert
    # Attention: by num_examples, (1 * 1 + 3 * b) / 4.
    torch.testing.assert_close(out[ATTN], (1.0 + 3 * b.params[ATTN]) / 4)
    # Layer 0 expert 0: by tokens, (30 * 1 + 10 * b) / 40.
    torch.testing.assert_close(out[_expert(0, 0)], (30.0 + 10 * b.params[_expert(0, 0)]) / 40)
    # Layer 0 expert 1: a routed nothing there, so it is b's tensor exactly: (0 * 1 + 20 * b) / 20.
    assert torch.equal(out[_expert(0, 1)], b.params[_expert(0, 1)])
    # Layer 1 expert 0: nobody routed to it, so the global value stays.
    assert torch.equal(out[_expert(1, 0)], global_params[_expert(1, 0)])
    # Layer 1 expert 1: (5 * 1 + 15 * b) / 20.
    torch.testing.assert_close(out[_expert(1, 1)], (5.0 + 15 * b.params[_expert(1, 1)]) / 20)


def test_without_moe_aware_every_tensor_is_weighted_by_num_examples():
    global_params, (a, b) = _moe_round()
    out = FedAvg().aggregate_fit(1, global_params, [a, b])
    for name in global_params:  # unused expert included: (1 * 1 + 3 * b) / 4
        torch.testing.assert_close(out[name], (1.0 + 3 * b.params[name]) / 4)


@pytest.mark.parametrize("moe_aware", [False, True])
def test_sums_then_mean_equal_aggregate_fit(moe_aware):
    # Prepare: what secure aggregation does: each silo sends numerators and weights, the server
    # only sees their sums.
    global_params, updates = _moe_round()
    parts = [weighted_numerators(u, moe_aware) for u in updates]
    # Execute
    from_sums = weighted_mean_from_sums(
        sum_params([n for n, _ in parts]), sum_params([w for _, w in parts]), global_params
    )
    direct = FedAvg(moe_aware=moe_aware).aggregate_fit(1, global_params, updates)
    # Assert
    assert from_sums.keys() == direct.keys()
    for name in direct:
        assert torch.equal(from_sums[name], direct[name])


def test_weighted_numerators_by_hand():
    _, (a, _) = _moe_round()
    numerators, weights = weighted_numerators(a, moe_aware=True)
    # Silo a: attention weight = 1 example; layer 0 expert 0 weight = 30 tokens -> 30 * 1.0.
    assert float(weights[ATTN]) == 1.0 and float(weights[_expert(0, 0)]) == 30.0
    assert torch.equal(numerators[_expert(0, 0)], torch.full((2, 3), 30.0, dtype=torch.float64))


# ---- FedAdam / FedYogi: two rounds on a 2-element parameter ---------------------------------------
# Round 1: global x0 = (1, 2). Silos send (3, 2) with 1 example and (1, 2) with 3 examples:
#   FedAvg mean = ((3 + 3) / 4, 2) = (1.5, 2), delta1 = (0.5, 0).
# Round 2: both silos send x1 + (-0.02, 0), so delta2 = (-0.02, 0).
# The second coordinate never moves: m = v = 0, and 0 / (sqrt(0) + tau) = 0.
def _round_updates(x, d):
    if d == "round1":
        return [_update("a", {"w": torch.tensor([3.0, 2.0])}, 1), _update("b", {"w": torch.tensor([1.0, 2.0])}, 3)]
    target = x["w"] + torch.tensor([-0.02, 0.0])
    return [_update("a", {"w": target.clone()}, 1), _update("b", {"w": target.clone()}, 3)]


def _two_rounds(strategy):
    x0 = {"w": torch.tensor([1.0, 2.0])}
    x1 = strategy.aggregate_fit(1, x0, _round_updates(x0, "round1"))
    x2 = strategy.aggregate_fit(2, x1, _round_updates(x1, "round2"))
    return x1, x2


def test_fedadam_two_rounds_by_hand():
    x1, x2 = _two_rounds(FedAdam())  # Flower defaults: eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-3
    # Round 1: m1 = 0.1 * 0.5 = 0.05; v1 = 0.01 * 0.5^2 = 0.0025, sqrt(v1) = 0.05.
    #   step1 = 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2) = 0.1 * sqrt(0.0199) / 0.19 ~ 0.0742460
    #   x1 = 1 + step1 * 0.05 / (0.05 + 0.001) ~ 1 + 0.0742460 * 0.980392 ~ 1.0727902
    step1 = 0.1 * math.sqrt(0.0199) / 0.19
    x1_expected = 1.0 + step1 * 0.05 / 0.051
    torch.testing.assert_close(x1["w"], torch.tensor([x1_expected, 2.0]))
    # Round 2: m2 = 0.9 * 0.05 + 0.1 * (-0.02) = 0.043; v2 = 0.99 * 0.0025 + 0.01 * 0.0004 = 0.002479,
    #   sqrt(v2) ~ 0.0497896. step2 = 0.1 * sqrt(1 - 0.99^3) / (1 - 0.9^3) = 0.1 * sqrt(0.029701) / 0.271
    #   ~ 0.0635940;  x2 = x1 + step2 * 0.043 / (0.0497896 + 0.001) ~ x1 + 0.0538406 ~ 1.1266308
    step2 = 0.1 * math.sqrt(0.029701) / 0.271
    x2_expected = x1_expected + step2 * 0.043 / (math.sqrt(0.002479) + 0.001)
    torch.testing.assert_close(x2["w"], torch.tensor([x2_expected, 2.0]))


def test_fedyogi_two_rounds_by_hand():
    x1, x2 = _two_rounds(FedYogi())  # Flower defaults: eta 0.01, beta_1 0.9, beta_2 0.99, tau 1e-3
    # Round 1: m1 = 0.05; v1 = 0 - 0.01 * 0.25 * sign(0 - 0.25) = 0.0025; no bias correction:
    #   x1 = 1 + 0.01 * 0.05 / (0.05 + 0.001) ~ 1 + 0.0098039 = 1.0098039
    x1_expected = 1.0 + 0.01 * 0.05 / 0.051
    torch.testing.assert_close(x1["w"], torch.tensor([x1_expected, 2.0]))
    # Round 2: m2 = 0.043; delta^2 = 0.0004 < v1, so v2 = 0.0025 - 0.01 * 0.0004 = 0.002496 (Adam's
    #   0.002479 differs: Yogi shrinks v additively); x2 = x1 + 0.01 * 0.043 / (sqrt(0.002496) + 0.001)
    #   ~ x1 + 0.01 * 0.043 / 0.0509600 ~ x1 + 0.0084380
    x2_expected = x1_expected + 0.01 * 0.043 / (math.sqrt(0.002496) + 0.001)
    torch.testing.assert_close(x2["w"], torch.tensor([x2_expected, 2.0]))


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_fedopt_state_dict_resumes_bit_exactly(cls):
    # Prepare: round 1 on one strategy, its state checkpointed through torch.save into a fresh one.
    x0 = {"w": torch.tensor([1.0, 2.0])}
    first = cls()
    x1 = first.aggregate_fit(1, x0, _round_updates(x0, "round1"))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = cls()
    resumed.load_state_dict(torch.load(buffer))
    # Execute: round 2 on both.
    expected = first.aggregate_fit(2, x1, _round_updates(x1, "round2"))
    got = resumed.aggregate_fit(2, x1, _round_updates(x1, "round2"))
    # Assert
    assert torch.equal(got["w"], expected["w"])
    assert all(torch.equal(resumed.state_dict()[s]["w"], first.state_dict()[s]["w"]) for s in ("m", "v"))


# ---- configure_fit --------------------------------------------------------------------------------
SILOS = [f"silo{i}" for i in range(10)]


@pytest.mark.parametrize(
    ("fraction", "min_fit", "available", "expected"),
    [
        (1.0, 2, 10, 10),  # Flower defaults: everyone
        (0.5, 2, 10, 5),  # int(0.5 * 10) = 5
        (0.35, 2, 10, 3),  # int(3.5) = 3: Flower rounds down
        (0.1, 2, 10, 2),  # int(1.0) = 1 < min_fit_clients 2 -> 2
        (0.5, 5, 3, 3),  # max(5, int(1.5) = 1) = 5, capped at the 3 available
    ],
)
def test_configure_fit_sample_size_follows_flower(fraction, min_fit, available, expected):
    strategy = FedAvg(fraction_fit=fraction, min_fit_clients=min_fit)
    pairs = strategy.configure_fit(1, {}, SILOS[:available], np.random.default_rng(0))
    silos = [s for s, _ in pairs]
    assert len(silos) == expected
    assert len(set(silos)) == expected and set(silos) <= set(SILOS[:available])


def test_configure_fit_needs_min_available_silos():
    with pytest.raises(NotEnoughSilos, match="1 silos available, min_available_clients=2"):
        FedAvg().configure_fit(1, {}, ["only"], np.random.default_rng(0))


def test_configure_fit_is_deterministic_for_a_seed():
    strategy = FedAvg(fraction_fit=0.3)
    first = [s for s, _ in strategy.configure_fit(1, {}, SILOS, np.random.default_rng(42))]
    again = [s for s, _ in strategy.configure_fit(1, {}, SILOS, np.random.default_rng(42))]
    assert first == again


def test_configure_fit_instructions_and_fedprox_mu():
    params = {"w": torch.zeros(1)}
    plain = FedAvg(local_steps=4, lr=2e-4).configure_fit(3, params, SILOS[:2], np.random.default_rng(0))
    prox = FedProx(proximal_mu=0.5).configure_fit(3, params, SILOS[:2], np.random.default_rng(0))
    assert [(ins.round, ins.proximal_mu, ins.local_steps, ins.lr) for _, ins in plain] == [(3, 0.0, 4, 2e-4)] * 2
    assert [ins.proximal_mu for _, ins in prox] == [0.5, 0.5]
    assert all(ins.params is params for _, ins in plain + prox)


# ---- builder and defaults -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "cls", "individual"),
    [
        ("fedavg", FedAvg, False),
        ("fedprox", FedProx, False),
        ("fedadam", FedAdam, False),
        ("fedyogi", FedYogi, False),
        ("median", FedMedian, True),
        ("trimmed_mean", FedTrimmedAvg, True),
        ("krum", Krum, True),
    ],
)
def test_build_strategy_names(name, cls, individual):
    strategy = build_strategy(name)
    assert type(strategy) is cls and strategy.needs_individual_updates is individual


def test_build_strategy_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'fedsgd'.*'fedadam', 'fedavg'"):
        build_strategy("fedsgd")
    with pytest.raises(ValueError, match="unknown option 'betta'"):
        build_strategy("trimmed_mean", betta=0.1)
    with pytest.raises(ValueError, match=r"beta=0\.6"):
        build_strategy("trimmed_mean", beta=0.6)


def test_defaults_are_flowers():
    # Values read from flwr/serverapp/strategy/{fedavg,fedadam,fedyogi,fedtrimmedavg,krum}.py.
    avg, adam, yogi = FedAvg(), FedAdam(), FedYogi()
    assert (avg.fraction_fit, avg.min_fit_clients, avg.min_available_clients) == (1.0, 2, 2)
    assert (adam.eta, adam.beta_1, adam.beta_2, adam.tau) == (0.1, 0.9, 0.99, 1e-3)
    assert (yogi.eta, yogi.beta_1, yogi.beta_2, yogi.tau) == (0.01, 0.9, 0.99, 1e-3)
    assert FedTrimmedAvg().beta == 0.2
    assert (Krum().num_malicious_clients, Krum().num_clients_to_keep) == (0, 0)
