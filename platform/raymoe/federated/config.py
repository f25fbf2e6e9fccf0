"""Federated fine-tuning job configuration: silos, strategy, privacy, faults.

A silo is named, reads one local JSONL path (on its own node; the server never opens it) and is
pinned by a Ray custom resource (`silo_<name>` unless set), which a KubeRay worker group or a
`ray start --resources` gives only to the silo's nodes. Everything that can be checked without
starting Ray is checked here, including combinations that cannot work (secure aggregation with an
aggregator that needs each update on its own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from raymoe.config import require, require_at_least, require_resource, same_path, to_dict
from raymoe.models.lora import LoRAConfig
from raymoe.train.config import OptimConfig

STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed_mean", "krum")
# Aggregators that only need the (weighted) mean of the updates: secure aggregation and DP fit.
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")


@dataclass(kw_only=True)
class SiloConfig:
    """One data silo."""

    name: str
    # Training records on the silo's node (JSONL chat or prompt/completion).
    data_path: str
    # Ray custom resource only the silo's nodes have; empty = `silo_<name>`.
    resource: str = ""

    def __post_init__(self) -> None:
        require(
            bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
            f"name must be letters, digits, - or _, got {self.name!r}",
        )
        require(bool(self.data_path), f"data_path must be set (the records of silo {self.name!r})")

    @property
    def resource_name(self) -> str:
        return self.resource or f"silo_{self.name}"


@dataclass(kw_only=True)
class StrategyConfig:
    """Aggregation strategy and its options; unset options take Flower's defaults."""

    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed_mean", "krum"] = "fedavg"
    fraction_fit: float = 1.0
    min_fit_clients: int = 2
    min_available_clients: int = 2
    # Weight each routed expert's adapter by the tokens each silo routed to it (mean strategies).
    moe_aware: bool = False
    # Further strategy options by name (e.g. proximal_mu, eta, beta, num_malicious_clients).
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(0 < self.fraction_fit <= 1, f"strategy.fraction_fit must be in (0, 1], got {self.fraction_fit}")
        require_at_least("strategy", self, min_fit_clients=1, min_available_clients=1)


@dataclass(kw_only=True)
class PrivacyConfig:
    """Differential privacy (clip + Gaussian noise, DP-FedAvg) and secure aggregation."""

    # L2 bound of each silo's update; 0 = no clipping and no noise.
    clip_norm: float = 0.0
    # Noise std = noise_multiplier * clip_norm on the sum of updates; 0 = clipping only.
    noise_multiplier: float = 0.0
    # The delta of the (epsilon, delta) guarantee reported each round.
    delta: float = 1e-5
    # Silos mask their updates with pairwise masks; the server only ever sees the sum.
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        require(
            math.isfinite(self.clip_norm) and self.clip_norm >= 0,
            f"privacy.clip_norm must be a finite number >= 0, got {self.clip_norm}",
        )
        require(
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0,
            f"privacy.noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}",
        )
        require(
            self.noise_multiplier == 0 or self.clip_norm > 0,
            f"privacy.noise_multiplier={self.noise_multiplier} needs privacy.clip_norm > 0 "
            "(the noise is scaled to the clipping bound)",
        )
        require(0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}")

    @property
    def dp(self) -> bool:
        return self.clip_norm > 0


@dataclass(kw_only=True)
class FaultConfig:
    """What a round tolerates before it is retried, and when the job gives up."""

    # Seconds the server waits for the selected silos; late ones are skipped for the round.
    round_deadline_s: float = 600.0
    # Fewest accepted updates a round needs; below it the round is retried.
    quorum: int = 2
    # Retries of a round that missed its quorum before the job stops (state kept for a rerun).
    max_round_retries: int = 2
    # Updates whose L2 distance from the global adapter exceeds this are rejected; 0 = no bound.
    max_update_norm: float = 0.0
    # Seconds to wait for every silo actor to start on a node offering its resource.
    silo_start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        require(self.round_deadline_s > 0, f"faults.round_deadline_s must be > 0, got {self.round_deadline_s}")
        require(self.quorum >= 1, f"faults.quorum must be >= 1, got {self.quorum}")
        require(self.max_round_retries >= 0, f"faults.max_round_retries must be >= 0, got {self.max_round_retries}")
        require(self.max_update_norm >= 0, f"faults.max_update_norm must be >= 0, got {self.max_update_norm}")
        require(
            self.silo_start_timeout_s > 0, f"faults.silo_start_timeout_s must be > 0, got {self.silo_start_timeout_s}"
        )


def _local_optim() -> OptimConfig:
    return OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.0, min_lr_ratio=1.0)


@dataclass(kw_only=True)
class FederatedConfig:
    """A federated LoRA run; YAML at pipelines/configs/federated.*.yaml."""

    name: str = "federated"
    # HF-format artifact every silo adapts (present on every silo's node).
    base: str
    # The one path where a random-weight debug base may be written (debug configs only): when
    # `base` is this path and holds no artifact, the job writes one there first. Any other `base`
    # must hold an artifact already. "" = never write one.
    debug_base: str = ""
    silos: list[SiloConfig]
    # The server's own held-out records, evaluated after each round; empty = no evaluation.
    eval_path: str = ""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Local training on each silo (lr is the local learning rate, constant within a round).
    optim: OptimConfig = field(default_factory=_local_optim)
    local_steps: int = 10
    # reset: each round's local training starts with fresh Adam moments (stateless clients, as
    # Flower's); keep: a silo carries its moments across rounds (identical silos then train
    # exactly like one centralised run).
    local_optimizer_state: Literal["reset", "keep"] = "reset"
    local_batch_size: int = 4
    max_seq_len: int = 256
    rounds: int
    seed: int = 0
    # Round state (round-NNNNN.pt), the final adapter (adapter/) and metrics.json go here.
    output_dir: str
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    # Ray resources and torch threads of each silo actor.
    num_cpus_per_silo: float = 1.0
    num_threads_per_silo: int = 1
    # Continue from the newest valid round state under output_dir.
    resume: bool = True

    def __post_init__(self) -> None:
        names = [s.name for s in self.silos]
        require(len(names) >= 1, "silos must list at least one silo")
        require(len(set(names)) == len(names), f"silos[].name must be unique, got {names}")
        require(bool(self.base), "base must be set (an HF-format artifact directory)")
        require_at_least("", self, rounds=1, local_steps=1, local_batch_size=1, max_seq_len=2, num_threads_per_silo=1)
        require_resource("num_cpus_per_silo", self.num_cpus_per_silo)
        require(self.num_cpus_per_silo > 0, f"num_cpus_per_silo must be > 0, got {self.num_cpus_per_silo}")
        require(bool(self.output_dir), "output_dir must be set")
        strategy = self.strategy.name
        require(
            not self.privacy.secure_aggregation or strategy in MEAN_STRATEGIES,
            f"privacy.secure_aggregation=true cannot be combined with strategy.name={strategy}: "
            f"it needs each silo's update, which secure aggregation hides; use one of {MEAN_STRATEGIES}",
        )
        require(
            not self.privacy.dp or strategy in MEAN_STRATEGIES,
            f"privacy.clip_norm > 0 (DP-FedAvg) needs a mean-based strategy, one of {MEAN_STRATEGIES}; "
            f"got strategy.name={strategy}",
        )
        require(
            not (self.privacy.dp and self.strategy.moe_aware),
            "privacy.clip_norm > 0 averages clipped updates with equal weights; strategy.moe_aware must be false",
        )
        require(
            not self.privacy.secure_aggregation or self.strategy.min_fit_clients >= 2,
            "privacy.secure_aggregation=true needs strategy.min_fit_clients >= 2 (a masked sum of "
            f"one silo is that silo's update), got {self.strategy.min_fit_clients}",
        )
        require(
            self.faults.quorum <= len(names),
            f"faults.quorum={self.faults.quorum} exceeds the {len(names)} silos configured",
        )
        require(
            self.strategy.min_available_clients <= len(names),
            f"strategy.min_available_clients={self.strategy.min_available_clients} exceeds the "
            f"{len(names)} silos configured",
        )
        require(
            self.strategy.min_fit_clients <= len(names),
            f"strategy.min_fit_clients={self.strategy.min_fit_clients} exceeds the {len(names)} silos configured",
        )
        self.build_strategy()  # options checked now, not after the silos started

    @property
    def writes_debug_base(self) -> bool:
        """True when `base` is the debug config's own `debug_base` path."""
        return bool(self.debug_base) and same_path(self.base, self.debug_base)

    def build_strategy(self):
        """The configured strategy object (raymoe.federated.strategies)."""
        from raymoe.config import ConfigError
        from raymoe.federated.strategies import build_strategy

        options = {
            "fraction_fit": self.strategy.fraction_fit,
            "min_fit_clients": self.strategy.min_fit_clients,
            "min_available_clients": self.strategy.min_available_clients,
            "local_steps": self.local_steps,
            "lr": self.optim.lr,
            **self.strategy.options,
        }
        if self.strategy.name in MEAN_STRATEGIES:
            options["moe_aware"] = self.strategy.moe_aware
        try:
            return build_strategy(self.strategy.name, **options)
        except ConfigError as exc:
            raise ConfigError(f"strategy: {exc}") from None

    def to_dict(self) -> dict:
        return to_dict(self)
