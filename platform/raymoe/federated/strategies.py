"""Federated strategies as symmetric configure_fit / aggregate_fit pairs over pure maths (Flower's design).

Formulas and defaults follow Flower (adap/flower@fdef7af, 2026-03: the legacy `flwr/server/strategy`
and the current `flwr/serverapp/strategy`, which agree except where noted); flwr is not a dependency.
- FedAvg: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
  Decentralized Data" (AISTATS); weighted mean by num_examples.
- FedProx: Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (MLSys); FedAvg
  aggregation, the silo adds (mu / 2) * ||w - w_global||^2 to its loss.
- FedAdam / FedYogi: Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), via Flower's
  FedOpt: the FedAvg mean minus the current global model is a pseudo-gradient for a server optimiser.
- FedMedian, FedTrimmedAvg, Krum / multi-Krum: see `raymoe.federated.robust`.

Sampling follows Flower: `max(min_fit_clients, int(fraction_fit * available))` silos (Flower
rounds down with int(); we also cap at the number available where Flower would fail the round).

MoE-aware weighting (`moe_aware=True`): each routed-expert tensor is averaged with weights = the
tokens each silo routed to that (layer, expert), so a silo that never used an expert does not pull
it; an expert no silo used keeps its global value. The weighted mean is written as sums
(`weighted_numerators` on the silo, `weighted_mean_from_sums` on the server) so it also works
under secure aggregation, where the server only ever sees the sums.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import numpy as np
import torch

from raymoe.config import ConfigError
from raymoe.federated import robust
from raymoe.federated.updates import ClientUpdate, Params, expert_of, flatten, unflatten


class NotEnoughSilos(RuntimeError):
    """Fewer silos are available than the strategy's `min_available_clients`."""


@dataclass
class FitInstructions:
    """What the server sends each selected silo for one round (`params` is shared: read-only)."""

    round: int
    params: Params
    # Weight of the FedProx proximal term (mu / 2) * ||w - params||^2; 0 for every other strategy.
    proximal_mu: float
    local_steps: int
    lr: float


def weighted_numerators(update: ClientUpdate, moe_aware: bool) -> tuple[Params, Params]:
    """A silo's share of the weighted mean: ({name: weight * tensor}, {name: 0-d weight}), float64.

    The weight is `num_examples`, except for routed-expert tensors under `moe_aware`, which take the
    tokens this silo routed to that (layer, expert).
    """
    numerators: Params = {}
    weights: Params = {}
    for name, tensor in update.params.items():
        expert = expert_of(name) if moe_aware else None
        weight = update.num_examples if expert is None else int(update.tokens_per_expert_LE[expert])
        # float64: a float32 value times a count below 2**29 is exact, so a tensor only one silo
        # contributed comes back bit-exact, and counts stay exact far past float32's 2**24.
        numerators[name] = tensor.to(torch.float64) * weight
        weights[name] = torch.tensor(float(weight), dtype=torch.float64)
    return numerators, weights


def sum_params(parts: list[Params]) -> Params:
    """Key-wise sum of same-keyed parameter dicts, added in list order."""
    keys = sorted(parts[0])
    total = [parts[0][k].clone() for k in keys]
    for part in parts[1:]:
        torch._foreach_add_(total, [part[k] for k in keys])
    return dict(zip(keys, total, strict=True))


def weighted_mean_from_sums(numerator_sum: Params, weight_sum: Params, current: Params) -> Params:
    """Server side of the weighted mean: numerator_sum / weight_sum, or `current` where the weight is 0."""
    return {
        k: current[k].clone()
        if float(weight_sum[k]) == 0.0
        else (numerator_sum[k] / weight_sum[k]).to(current[k].dtype)
        for k in current
    }


def _weighted_mean(params: Params, updates: list[ClientUpdate], moe_aware: bool) -> Params:
    parts = [weighted_numerators(u, moe_aware) for u in updates]
    return weighted_mean_from_sums(sum_params([n for n, _ in parts]), sum_params([w for _, w in parts]), params)


def _expect(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"strategy option {name}={value!r}: expected {expected}")


def _require_updates(updates: list[ClientUpdate]) -> None:
    # Flower returns None here; a round with nothing accepted is the server's decision, not ours.
    if not updates:
        raise ValueError("aggregate_fit needs at least one accepted update, got none")


@dataclass(kw_only=True)
class Strategy(ABC):
    """Base: Flower's client sampling, plus the local-training knobs sent to every silo."""

    fraction_fit: float = 1.0  # Flower FedAvg default
    min_fit_clients: int = 2  # Flower FedAvg default
    min_available_clients: int = 2  # Flower FedAvg default
    local_steps: int = 10  # ours: optimiser steps per silo per round
    lr: float = 1e-3  # ours: the silo's local learning rate

    # True when aggregation must see each update on its own, so secure aggregation is impossible.
    needs_individual_updates: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _expect(0.0 <= self.fraction_fit <= 1.0, "fraction_fit", self.fraction_fit, "a fraction in [0, 1]")
        _expect(self.min_fit_clients >= 1, "min_fit_clients", self.min_fit_clients, ">= 1")
        _expect(self.min_available_clients >= 1, "min_available_clients", self.min_available_clients, ">= 1")
        _expect(self.local_steps >= 1, "local_steps", self.local_steps, ">= 1")
        _expect(self.lr > 0.0, "lr", self.lr, "> 0")

    def num_fit_clients(self, num_available: int) -> int:
        """Silos to sample from `num_available`: Flower's max(min_fit_clients, int(fraction * n)), capped at n."""
        return min(num_available, max(self.min_fit_clients, int(num_available * self.fraction_fit)))

    def configure_fit(
        self, round: int, params: Params, available: list[str], rng: np.random.Generator
    ) -> list[tuple[str, FitInstructions]]:
        """Sample silos without replacement and pair each with the round's instructions.

        Raises:
            NotEnoughSilos: fewer than `min_available_clients` silos are available.
        """
        if len(available) < self.min_available_clients:
            raise NotEnoughSilos(
                f"{len(available)} silos available, min_available_clients={self.min_available_clients}"
            )
        chosen = rng.choice(len(available), size=self.num_fit_clients(len(available)), replace=False)
        instructions = FitInstructions(
            round=round, params=params, proximal_mu=0.0, local_steps=self.local_steps, lr=self.lr
        )
        return [(available[i], instructions) for i in chosen.tolist()]

    @abstractmethod
    def aggregate_fit(self, round: int, params: Params, updates: list[ClientUpdate]) -> Params:
        """New global params from the round's accepted updates; `params` is what the silos were sent."""


@dataclass(kw_only=True)
class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017): the num_examples-weighted mean (token-weighted experts if moe_aware)."""

    moe_aware: bool = False

    def aggregate_fit(self, round: int, params: Params, updates: list[ClientUpdate]) -> Params:
        _require_updates(updates)
        return self.step_from_mean(round, params, _weighted_mean(params, updates, self.moe_aware))

    def step_from_mean(self, round: int, params: Params, mean: Params) -> Params:
        """The new global params from the round's (weighted) mean: FedAvg takes the mean itself.

        The server calls this directly when it only ever sees the mean (secure aggregation, DP).
        """
        return mean


@dataclass(kw_only=True)
class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg aggregation; configure_fit sends `proximal_mu` to the silos."""

    # Legacy Flower requires mu; current Flower defaults to 0.0 and warns that this is FedAvg. We
    # default to 0.01, from the middle of the paper's tuning set {0.001, 0.01, 0.1, 1}: a mild pull
    # that does not freeze small LoRA deltas.
    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _expect(self.proximal_mu >= 0.0, "proximal_mu", self.proximal_mu, ">= 0")

    def configure_fit(
        self, round: int, params: Params, available: list[str], rng: np.random.Generator
    ) -> list[tuple[str, FitInstructions]]:
        pairs = super().configure_fit(round, params, available, rng)
        return [(silo, replace(ins, proximal_mu=self.proximal_mu)) for silo, ins in pairs]


@dataclass(kw_only=True)
class FedOpt(FedAvg, ABC):
    """Flower's FedOpt: delta = FedAvg mean - params; m = b1 m + (1 - b1) delta; x += step * m / (sqrt(v) + tau).

    The moments start at zero (as Flower) and live in this object: checkpoint them with
    `state_dict()` / `load_state_dict()`. Under moe_aware an expert no silo used has delta 0, but
    its momentum from earlier rounds still moves it, as in any Adam-style optimiser.
    """

    eta: float  # server learning rate
    beta_1: float
    beta_2: float
    tau: float  # adaptivity: added to sqrt(v) in the denominator
    # Optimiser state, not options: kept out of __init__, repr and ==.
    m: Params = field(default_factory=dict, init=False, repr=False, compare=False)
    v: Params = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _expect(self.eta > 0.0, "eta", self.eta, "> 0")
        _expect(0.0 <= self.beta_1 < 1.0, "beta_1", self.beta_1, "in [0, 1)")
        _expect(0.0 <= self.beta_2 < 1.0, "beta_2", self.beta_2, "in [0, 1)")
        _expect(self.tau > 0.0, "tau", self.tau, "> 0")

    @abstractmethod
    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _step_size(self, round: int) -> float: ...

    def step_from_mean(self, round: int, params: Params, mean: Params) -> Params:
        delta = {k: mean[k] - params[k] for k in params}
        if not self.m:
            self.m = {k: torch.zeros_like(d) for k, d in delta.items()}
            self.v = {k: torch.zeros_like(d) for k, d in delta.items()}
        self.m = {k: self.beta_1 * self.m[k] + (1.0 - self.beta_1) * delta[k] for k in delta}
        self.v = {k: self._second_moment(self.v[k], delta[k]) for k in delta}
        step = self._step_size(round)
        return {k: params[k] + step * self.m[k] / (self.v[k].sqrt() + self.tau) for k in params}

    def state_dict(self) -> dict[str, Params]:
        """Copies of the server optimiser's moments {"m": ..., "v": ...} (empty before round 1)."""
        return {"m": {k: t.clone() for k, t in self.m.items()}, "v": {k: t.clone() for k, t in self.v.items()}}

    def load_state_dict(self, state: dict[str, Params]) -> None:
        """Restore moments saved by `state_dict` (copied, so the caller may reuse `state`)."""
        self.m = {k: t.clone() for k, t in state["m"].items()}
        self.v = {k: t.clone() for k, t in state["v"].items()}


@dataclass(kw_only=True)
class FedAdam(FedOpt):
    """FedAdam: v = b2 v + (1 - b2) delta^2, with Adam's bias-corrected step as in current Flower.

    step = eta * sqrt(1 - b2^(round + 1)) / (1 - b1^(round + 1)). Flower counts rounds from 1 and
    uses round + 1 as the exponent, so round 1 is already corrected with t = 2; kept to match Flower.
    Defaults are current Flower's (`flwr.serverapp.strategy.FedAdam`; the legacy one had tau=1e-9).
    """

    eta: float = 1e-1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta.square()

    def _step_size(self, round: int) -> float:
        return self.eta * math.sqrt(1.0 - self.beta_2 ** (round + 1)) / (1.0 - self.beta_1 ** (round + 1))


@dataclass(kw_only=True)
class FedYogi(FedOpt):
    """FedYogi: v = v - (1 - b2) delta^2 sign(v - delta^2), no bias correction (Flower's defaults)."""

    eta: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        delta2 = delta.square()
        return v - (1.0 - self.beta_2) * delta2 * torch.sign(v - delta2)

    def _step_size(self, round: int) -> float:
        return self.eta


@dataclass(kw_only=True)
class FedMedian(Strategy):
    """Coordinate-wise median of the silos' params (Yin et al. 2018; Flower's FedMedian)."""

    needs_individual_updates: ClassVar[bool] = True

    def aggregate_fit(self, round: int, params: Params, updates: list[ClientUpdate]) -> Params:
        _require_updates(updates)
        return unflatten(robust.coordinate_median([flatten(u.params) for u in updates]), params)


@dataclass(kw_only=True)
class FedTrimmedAvg(Strategy):
    """Coordinate-wise mean after cutting int(beta * N) values off each end (Flower's FedTrimmedAvg)."""

    needs_individual_updates: ClassVar[bool] = True
    beta: float = 0.2  # Flower default

    def __post_init__(self) -> None:
        super().__post_init__()
        _expect(0.0 <= self.beta < 0.5, "beta", self.beta, "a fraction in [0, 0.5)")

    def aggregate_fit(self, round: int, params: Params, updates: list[ClientUpdate]) -> Params:
        _require_updates(updates)
        return unflatten(robust.trimmed_mean([flatten(u.params) for u in updates], self.beta), params)


@dataclass(kw_only=True)
class Krum(Strategy):
    """Krum (Blanchard et al. 2017): the lowest-score silo's params. Multi-Krum when
    num_clients_to_keep > 0: the num_examples-weighted mean of that many best (Flower's Krum)."""

    needs_individual_updates: ClassVar[bool] = True
    num_malicious_clients: int = 0  # Flower default
    num_clients_to_keep: int = 0  # Flower default: 0 means classical Krum

    def __post_init__(self) -> None:
        super().__post_init__()
        _expect(self.num_malicious_clients >= 0, "num_malicious_clients", self.num_malicious_clients, ">= 0")
        _expect(self.num_clients_to_keep >= 0, "num_clients_to_keep", self.num_clients_to_keep, ">= 0")

    def aggregate_fit(self, round: int, params: Params, updates: list[ClientUpdate]) -> Params:
        _require_updates(updates)
        chosen = robust.krum_select(
            [flatten(u.params) for u in updates], self.num_malicious_clients, self.num_clients_to_keep
        )
        if self.num_clients_to_keep == 0:
            return {k: t.clone() for k, t in updates[chosen[0]].params.items()}
        return _weighted_mean(params, [updates[i] for i in chosen], moe_aware=False)


STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "median": FedMedian,
    "trimmed_mean": FedTrimmedAvg,
    "krum": Krum,
}


def build_strategy(name: str, **options: Any) -> Strategy:
    """The strategy called `name` (a key of STRATEGIES) built with `options` as its fields.

    Raises:
        ConfigError (a ValueError): unknown name, an option the strategy does not have, or a bad
            value; the message names it.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}: expected one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    allowed = sorted(f.name for f in fields(cls) if f.init)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} for strategy {name!r}: expected one of {allowed}")
    return cls(**options)
