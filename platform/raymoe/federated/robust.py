"""Byzantine-robust aggregation rules as pure functions on lists of flat parameter vectors.

Each function takes one 1-D tensor per client (`updates.flatten`, same length and dtype) and
follows Flower's `flwr/server/strategy/aggregate.py` and `flwr/serverapp/strategy/multikrum.py`:
- coordinate-wise median: Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates" (arxiv.org/abs/1803.01498); `np.median`, so an even count averages the two
  middle values (torch.median would return the lower one).
- coordinate-wise trimmed mean: same paper; `scipy.stats.trim_mean`, which cuts
  `int(beta * N)` values from each end of every coordinate, exactly as Flower's `_trim_mean`.
- Krum / multi-Krum: Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent" (NeurIPS); score = sum of squared L2 distances to the `max(1, N - f - 2)`
  nearest other clients, lowest scores win.

Inputs must be finite: `updates.check_update` rejects NaN/Inf before aggregation, and NaN would
otherwise poison the median and the Krum distances. Shape legend: N clients, P flat parameters.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
import torch


def _stack(flats: list[torch.Tensor]) -> torch.Tensor:
    if not flats:
        raise ValueError("robust aggregation needs at least one client vector, got none")
    return torch.stack(flats)


def coordinate_median(flats: list[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median over clients, (P,); even counts average the two middle values."""
    stack_NP = _stack(flats)
    return torch.from_numpy(np.median(stack_NP.numpy(), axis=0)).to(stack_NP.dtype)


def trimmed_mean(flats: list[torch.Tensor], beta: float) -> torch.Tensor:
    """Coordinate-wise mean after cutting `int(beta * N)` lowest and highest values, (P,).

    Raises:
        ValueError: when beta cuts every value (scipy's "Proportion too big.").
    """
    stack_NP = _stack(flats)
    return torch.from_numpy(np.asarray(scipy.stats.trim_mean(stack_NP.numpy(), beta, axis=0))).to(stack_NP.dtype)


def krum_scores(flats: list[torch.Tensor], num_malicious: int) -> torch.Tensor:
    """Krum score of every client, float64 (N,).

    Score i = sum of squared L2 distances from client i to its `max(1, N - f - 2)` nearest other
    clients (f = num_malicious); with fewer other clients than that, all of them.
    """
    # float64: squared distances of large adapter vectors lose digits in float32, and the
    # direct (non-matmul) cdist keeps ||x - x|| exactly 0.
    stack_NP = _stack(flats).double()
    num = stack_NP.shape[0]
    dist2_NN = torch.cdist(stack_NP, stack_NP, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    # A client is not its own neighbour.
    dist2_NN.fill_diagonal_(float("inf"))
    num_closest = min(max(1, num - num_malicious - 2), num - 1)
    return dist2_NN.topk(num_closest, dim=1, largest=False).values.sum(dim=1)


def krum_select(flats: list[torch.Tensor], num_malicious: int, num_to_keep: int) -> list[int]:
    """Indices of the clients Krum keeps, best first.

    Args:
        flats: one flat parameter vector per client.
        num_malicious: f, the number of Byzantine clients assumed.
        num_to_keep: 0 for classical Krum (one client), k > 0 for multi-Krum (the k best).

    Returns:
        Client indices ordered by score; ties go to the lower index.
    """
    scores_N = krum_scores(flats, num_malicious)
    order = torch.argsort(scores_N, stable=True)
    return order[: max(1, num_to_keep)].tolist()
