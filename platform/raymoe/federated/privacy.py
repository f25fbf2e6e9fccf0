"""Differential privacy for federated updates: clip, add Gaussian noise, account for the budget.

What (epsilon, delta) means here. The guarantee is user-level DP where the "user" is a whole silo:
for any set S of released model sequences, P[M(D) in S] <= e^epsilon * P[M(D') in S] + delta,
where D and D' differ by one silo's entire contribution (its adapter delta in every round, however
many records produced it). Records inside a silo are protected at least as well as the silo.
delta should be well below 1 / num_silos, or releasing one silo outright would fit the bound.

Mechanism (DP-FedAvg, McMahan et al. 2018): each participating silo clips its flat update to L2
norm C, so adding or removing one silo moves the sum by at most C (the sensitivity); Gaussian
noise N(0, (z*C)^2 I) is added to the sum of clipped updates, which is then divided by the
number of participants. Where the noise is drawn:
  central      the server adds N(0, (z*C)^2) to the sum; it must be trusted with clipped updates.
  distributed  each of n silos adds N(0, (z*C)^2 / n) to its own clipped update; a sum of n
               independent Gaussians has variance (z*C)^2, the same as central. Required under
               secure aggregation, where the server only ever sees the sum. If a silo drops out
               the round is aborted and the survivors re-noise for their new count (see
               secure_aggregation.py), so the released sum always carries the full variance.
               Colluding silos that subtract their own noise leave less than (z*C)^2 against
               themselves; that is the known cost of not trusting the server.
The divisor must be public and data-independent (the number of silos the round was configured
for), or the count itself would leak membership.

Accounting: each round is one step of the sampled Gaussian mechanism with noise multiplier z and
sample rate q = participants / total silos (the RDP analysis assumes each silo is picked
independently with probability q, as in McMahan et al.; picking exactly k silos is the usual
approximation). Steps compose in Renyi DP (Mironov 2017), the moments accountant of Abadi et
al. 2016, through opacus' RDPAccountant. RDP rather than PRV: it is the analysis the DP-FedAvg
paper uses, it is a deterministic upper bound with no numerical-error parameters, and it stays
valid and cheap for the few hundred rounds of a federated run, where PRV's tighter estimate
needs an eps_error tolerance and a discretisation grid to be chosen and checked.

References:
  Abadi et al. 2016, "Deep Learning with Differential Privacy" (DP-SGD, moments accountant),
    arXiv:1607.00133.
  McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language
    Models" (DP-FedAvg, user-level DP), ICLR 2018, arXiv:1710.06963.
  Mironov 2017, "Renyi Differential Privacy", CSF 2017, arXiv:1702.07476.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from opacus.accountants import RDPAccountant

from raymoe.config import ConfigError

NoiseMode = Literal["central", "distributed"]
NOISE_MODES: tuple[str, ...] = ("central", "distributed")


def clip_to_norm(delta: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, float]:
    """Scale a flat update so its L2 norm is at most max_norm.

    Args:
        delta: 1-D update (adapter parameter units).
        max_norm: clip bound C, same units, > 0.

    Returns:
        (delta * min(1, C / ||delta||), ||delta|| before clipping as a Python float).
    """
    # The norm is summed in float64: over millions of float32 entries the float32 sum drifts.
    norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
    scale = min(1.0, max_norm / norm) if norm > 0.0 else 1.0
    return delta * scale, norm


def gaussian_noise(shape: tuple[int, ...] | torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    """Draw float32 N(0, std^2) noise of the given shape from `generator` (std >= 0)."""
    if std < 0.0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


def noise_std(mode: NoiseMode, noise_multiplier: float, clip_norm: float, num_participants: int) -> float:
    """Standard deviation of the noise one party adds, in update units.

    Args:
        mode: "central" (the server is the one party) or "distributed" (each silo is one of n).
        noise_multiplier: z, noise std relative to the sensitivity C.
        clip_norm: C.
        num_participants: n silos whose updates enter this round's sum.

    Returns:
        z * C for central; z * C / sqrt(n) for distributed, so n such draws sum to variance (z*C)^2.
    """
    if num_participants < 1:
        raise ValueError(f"num_participants must be >= 1, got {num_participants}")
    if mode == "central":
        return noise_multiplier * clip_norm
    if mode == "distributed":
        return noise_multiplier * clip_norm / math.sqrt(num_participants)
    raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {mode!r}")


def privatize_update(
    delta: torch.Tensor,
    *,
    mode: NoiseMode,
    noise_multiplier: float,
    clip_norm: float,
    num_participants: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """Silo side: clip the flat update, and in distributed mode add this silo's share of noise.

    Returns:
        (the update to send, its L2 norm before clipping).
    """
    clipped, norm = clip_to_norm(delta, clip_norm)
    if mode == "central":
        return clipped, norm
    std = noise_std(mode, noise_multiplier, clip_norm, num_participants)
    return clipped + gaussian_noise(clipped.shape, std, generator), norm


def noisy_mean(
    update_sum: torch.Tensor,
    *,
    mode: NoiseMode,
    noise_multiplier: float,
    clip_norm: float,
    num_participants: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Server side: turn the sum of privatized updates into the released mean update.

    Central mode adds N(0, (z*C)^2) to the sum here; distributed mode adds nothing (the silos did).
    num_participants is the public divisor (see the module docstring).
    """
    std = noise_std(mode, noise_multiplier, clip_norm, num_participants)
    if mode == "central":
        update_sum = update_sum + gaussian_noise(update_sum.shape, std, generator)
    return update_sum / num_participants


def silo_sample_rate(num_participants: int, num_silos: int) -> float:
    """Fraction of all silos that take part in a round: the accountant's sample rate q."""
    if not 1 <= num_participants <= num_silos:
        raise ValueError(f"need 1 <= num_participants <= num_silos, got {num_participants} of {num_silos}")
    return num_participants / num_silos


class PrivacyAccountant:
    """Silo-level privacy budget over federated rounds (opacus RDPAccountant underneath).

    One `step` per aggregated round. `state_dict` is plain JSON-safe data, so a resumed server
    reloads it with the checkpoint and reports the same epsilon.
    """

    def __init__(self) -> None:
        self._accountant = RDPAccountant()

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one round with noise multiplier z > 0 and sample rate q in (0, 1]."""
        if not noise_multiplier > 0.0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this delta (0.0 before the first round)."""
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        return float(self._accountant.get_epsilon(delta=delta))

    @property
    def num_rounds(self) -> int:
        # opacus folds consecutive identical steps into (z, q, count) entries.
        return sum(int(steps) for _, _, steps in self._accountant.history)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self._accountant.mechanism(),
            "history": [[float(z), float(q), int(n)] for z, q, n in self._accountant.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mechanism") != self._accountant.mechanism():
            raise ValueError(
                f"privacy accountant state is for mechanism "
                f"{state.get('mechanism')!r}, "
                f"expected {self._accountant.mechanism()!r}"
            )
        # Tuples, as opacus itself appends them; JSON brings them back as lists.
        self._accountant.history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]


def validate_privacy_config(
    noise_multiplier: float, clip_norm: float, delta: float, target_epsilon: float | None = None
) -> None:
    """Check privacy settings at config load; raise ConfigError (a ValueError) naming the key."""

    def number(key: str, value: Any) -> float:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value):
            raise ConfigError(f"privacy.{key} must be a finite number, got {value!r}")
        return float(value)

    if number("noise_multiplier", noise_multiplier) <= 0.0:
        raise ConfigError(f"privacy.noise_multiplier must be > 0 (0 means no privacy), got {noise_multiplier!r}")
    if number("clip_norm", clip_norm) <= 0.0:
        raise ConfigError(f"privacy.clip_norm must be > 0, got {clip_norm!r}")
    if not 0.0 < number("delta", delta) < 1.0:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {delta!r}")
    if target_epsilon is not None and number("target_epsilon", target_epsilon) <= 0.0:
        raise ConfigError(f"privacy.target_epsilon must be > 0 or null, got {target_epsilon!r}")
