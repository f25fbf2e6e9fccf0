"""Drift detectors: pure functions comparing a reference window of served-traffic features with a
current window. numpy + scipy only; no Ray, no torch.

A window is a dict of feature arrays (any subset of `FEATURES`):
  prompt_length, output_length  1-D int, tokens per prompt / per response
  mean_logprob                  1-D float, mean token log-probability per response (nats)
  token_histogram               1-D int, token counts per token id (vocab-sized or bucketed)
  prompt_length_binned          1-D int, prompt counts per length bin (against a reference that
                                only has a histogram, e.g. the ingest manifest's profile)
  expert_load                   2-D int (L, E), tokens routed per expert per MoE layer
  embedding                     2-D float (N, D), pooled hidden-state embeddings

Detectors per feature (`DETECTORS`) and their default thresholds, taken from Evidently's legacy
`stattests` modules (evidentlyai/evidently, src/evidently/legacy/calculations/stattests/) and its
"Data drift algorithm" page (docs-old.evidentlyai.com/reference/data-drift-algorithm):
  psi          population stability index on a histogram; drift if PSI >= 0.1 (`psi.py`).
  chi2         chi-square test of homogeneity (`scipy.stats.chi2_contingency`); drift if p < 0.05
               (Evidently's `StatTest.default_threshold`, its "0.95 confidence level").
  ks           two-sample Kolmogorov-Smirnov (`scipy.stats.ks_2samp`); drift if p < 0.05
               (`ks_stattest.py`; Evidently's default for numerical columns, n <= 1000).
  wasserstein  Wasserstein-1 distance over the reference std (`scipy.stats.wasserstein_distance`),
               unit "reference standard deviations"; drift if >= 0.1
               (`wasserstein_distance_norm.py`; Evidently's default for numerical columns with
               n > 1000 only: its same-distribution spread shrinks as 1/sqrt(n), and at 500 vs 500
               rows it alarms on 19-24% of same-distribution pairs).
  js           Jensen-Shannon distance (`scipy.spatial.distance.jensenshannon`, natural log, so
               in [0, sqrt(ln 2)]) per MoE layer, max over layers; drift if >= 0.1
               (`jensenshannon.py`).
  mmd          unbiased RBF-kernel MMD^2 with a seeded permutation-test p-value; drift if p < 0.05.
               Evidently's default for embeddings is a domain classifier (ROC AUC > 0.55); an MMD
               permutation test on learned representations is the multivariate test of Rabanser
               et al. (2019). Memory is O((N + M)^2): subsample embeddings to a few hundred rows.

Chi-square differs from Evidently's `chisquare_stattest.py` on purpose: Evidently tests the current
counts against the reference proportions as if those were exact, ignoring the reference's own
sampling noise: on binned prompt lengths from one distribution it alarmed on 34% of 500-vs-500
pairs and 22% of 2000-vs-1000 pairs at alpha 0.05; the 2 x K homogeneity test here on 5% of both.
Cells whose expected count is below 5 are pooled (Cochran's rule).

References:
  Evidently AI, legacy `stattests` (psi, chisquare, ks, wasserstein_distance_norm, jensenshannon,
    mmd) and "Data drift algorithm"; PSI zero handling from `stattests/utils.py::get_binned_data`.
  S. Rabanser, S. Guennemann, Z. Lipton. Failing Loudly: An Empirical Study of Methods for
    Detecting Dataset Shift. NeurIPS 2019.
  A. Gretton, K. Borgwardt, M. Rasch, B. Schoelkopf, A. Smola. A Kernel Two-Sample Test. JMLR 13,
    2012 (unbiased MMD^2, eq. 3; median-distance bandwidth).
  B. Phipson, G. Smyth. Permutation P-values Should Never Be Zero. SAGMB 9, 2010.

Shapes: L MoE layers, E experts, N reference rows, M current rows, D embedding dim, K bins.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats
from scipy.spatial import distance

from raymoe.config import require

DETECTORS: dict[str, tuple[str, ...]] = {
    "prompt_length": ("psi", "chi2", "ks", "wasserstein"),
    "output_length": ("psi", "chi2", "ks", "wasserstein"),
    "mean_logprob": ("ks", "wasserstein"),
    "token_histogram": ("psi", "chi2"),
    "prompt_length_binned": ("psi", "chi2"),
    "expert_load": ("js",),
    "embedding": ("mmd",),
}
FEATURES = tuple(DETECTORS)
_NDIM = {"expert_load": 2, "embedding": 2}  # others 1-D: samples, or counts if in _COUNTS
_COUNTS = ("token_histogram", "prompt_length_binned", "expert_load")

# Below this many distinct reference values a numeric column is binned per value, above it into
# Sturges bins over both windows (Evidently `get_binned_data`).
_MAX_CATEGORIES = 20
_MIN_EXPECTED = 5.0  # Cochran's rule for the chi-square approximation
_WASSERSTEIN_MIN_STD = 0.001  # Evidently's floor on the reference std


@dataclass(kw_only=True)
class DriftConfig:
    """Thresholds per detector; defaults are Evidently's (see the module docstring)."""

    # Alarm when PSI >= this (dimensionless).
    psi_threshold: float = 0.1
    # Alarm when the chi-square homogeneity p-value < this.
    chi2_p_value: float = 0.05
    # Alarm when the KS p-value < this.
    ks_p_value: float = 0.05
    # Alarm when Wasserstein-1 / reference std >= this (unit: reference standard deviations).
    wasserstein_threshold: float = 0.1
    # Alarm when the largest per-layer Jensen-Shannon distance (natural log) >= this.
    js_threshold: float = 0.1
    # Alarm when the MMD permutation p-value < this.
    mmd_p_value: float = 0.05
    # Permutations for the MMD p-value; Evidently's `mmd_stattest.py` uses 100.
    mmd_permutations: int = 100
    # Seed of the MMD permutations, so a pair of windows always gets the same answer.
    seed: int = 0

    def __post_init__(self):
        for key in ("psi_threshold", "wasserstein_threshold", "js_threshold"):
            value = getattr(self, key)
            require(value > 0, f"drift.{key} must be > 0, got {value}")
        for key in ("chi2_p_value", "ks_p_value", "mmd_p_value"):
            value = getattr(self, key)
            require(0 < value < 1, f"drift.{key} must be in (0, 1), got {value}")
        # The smallest permutation p-value is 1 / (B + 1); it must be able to fall below alpha.
        min_permutations = math.floor(1 / self.mmd_p_value)
        require(
            self.mmd_permutations >= min_permutations,
            f"drift.mmd_permutations must be >= {min_permutations} (1 / drift.mmd_p_value) so "
            f"a p-value below {self.mmd_p_value} is possible, got {self.mmd_permutations}",
        )
        require(self.seed >= 0, f"drift.seed must be >= 0, got {self.seed}")


@dataclass
class DriftResult:
    """One detector on one feature. For tests (chi2, ks, mmd) `threshold` is the significance level
    compared with `p_value` and `score` the test statistic; for distances (psi, wasserstein, js)
    `threshold` is compared with `score` and `p_value` is None."""

    feature: str
    detector: str
    score: float
    threshold: float
    drifted: bool
    p_value: float | None = None


# --- detectors: each a pure function of two arrays --------------------------------------------


def psi(ref_counts_K: np.ndarray, cur_counts_K: np.ndarray) -> float:
    """Population stability index sum_k (r_k - c_k) ln(r_k / c_k) over bin proportions r, c.

    Bins empty in both windows are dropped (Evidently builds bins from the values present). A zero
    proportion is replaced, per window, by min(nonzero) / 1e6 if min(nonzero) <= 1e-4, else by
    1e-4, without renormalising: Evidently's `get_binned_data` zero handling.
    """
    keep = (ref_counts_K > 0) | (cur_counts_K > 0)
    ref = ref_counts_K[keep] / ref_counts_K.sum()
    cur = cur_counts_K[keep] / cur_counts_K.sum()
    for p in (ref, cur):
        smallest = p[p > 0].min()
        p[p == 0] = smallest / 1e6 if smallest <= 1e-4 else 1e-4
    return float(np.sum((ref - cur) * np.log(ref / cur)))


def chi2_homogeneity(ref_counts_K: np.ndarray, cur_counts_K: np.ndarray) -> tuple[float, float]:
    """Chi-square test that two histograms share one distribution: (statistic, p-value).

    Bins empty in both are dropped; bins with an expected count below 5 in either row are pooled
    into one bin. Fewer than two bins left means no evidence of change: (0.0, 1.0).
    """
    table = np.stack([ref_counts_K, cur_counts_K]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
    small = expected.min(axis=0) < _MIN_EXPECTED
    if small.any():
        table = np.column_stack([table[:, ~small], table[:, small].sum(axis=1)])
    if table.shape[1] < 2:
        return 0.0, 1.0
    result = stats.chi2_contingency(table)
    return float(result.statistic), float(result.pvalue)


def ks(ref_N: np.ndarray, cur_M: np.ndarray) -> tuple[float, float]:
    """Two-sided two-sample KS: (sup-distance of the empirical CDFs, p-value)."""
    result = stats.ks_2samp(ref_N, cur_M)
    return float(result.statistic), float(result.pvalue)


def wasserstein_normed(ref_N: np.ndarray, cur_M: np.ndarray) -> float:
    """Wasserstein-1 distance in units of the reference std (floored at 0.001, as Evidently)."""
    scale = max(float(np.std(ref_N)), _WASSERSTEIN_MIN_STD)
    return float(stats.wasserstein_distance(ref_N, cur_M)) / scale


def js_max_over_layers(ref_load_LE: np.ndarray, cur_load_LE: np.ndarray) -> float:
    """Largest over layers of the Jensen-Shannon distance between per-layer expert-load shares."""
    return max(
        float(distance.jensenshannon(ref_E, cur_E))  # normalises each row itself
        for ref_E, cur_E in zip(ref_load_LE, cur_load_LE)
    )


def mmd_permutation(ref_ND: np.ndarray, cur_MD: np.ndarray, *, num_permutations: int, seed: int) -> tuple[float, float]:
    """Unbiased MMD^2 with an RBF kernel and its permutation p-value: (MMD^2, p-value).

    k(x, y) = exp(-|x - y|^2 / (2 sigma^2)), sigma the median pairwise distance of the pooled
    sample (computed once on the pooled sample, so every relabelling sees the same kernel). MMD^2 is
    Gretton et al. (2012) eq. 3; p = (1 + #{permuted >= observed}) / (1 + B) (Phipson & Smyth).
    """
    n, m = len(ref_ND), len(cur_MD)
    pooled = np.concatenate([ref_ND, cur_MD]).astype(np.float64)
    pair_sq_dists = distance.pdist(pooled, "sqeuclidean")
    median_sq = float(np.median(pair_sq_dists))
    sq_dists = distance.squareform(pair_sq_dists)
    # sigma^2 = median squared distance, i.e. sigma = median distance.
    kernel = np.exp(-sq_dists / (2 * median_sq)) if median_sq > 0 else np.ones_like(sq_dists)
    np.fill_diagonal(kernel, 0.0)  # the unbiased estimator leaves out k(x_i, x_i)

    rng = np.random.default_rng(seed)
    labels = [np.arange(n + m)] + [rng.permutation(n + m) for _ in range(num_permutations)]
    in_ref = np.zeros((len(labels), n + m))  # row b: 1 where labelling b puts a point in reference
    for b, order in enumerate(labels):
        in_ref[b, order[:n]] = 1.0
    sum_rr = np.einsum("bi,ib->b", in_ref, kernel @ in_ref.T)
    sum_rc = in_ref @ kernel.sum(axis=1) - sum_rr
    sum_cc = kernel.sum() - sum_rr - 2 * sum_rc
    mmd2 = sum_rr / (n * (n - 1)) + sum_cc / (m * (m - 1)) - 2 * sum_rc / (n * m)
    p_value = (1 + np.sum(mmd2[1:] >= mmd2[0])) / (1 + num_permutations)
    return float(mmd2[0]), float(p_value)


def bin_samples(ref_N: np.ndarray, cur_M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of two samples on shared bins: one bin per value if the reference has at most 20
    distinct values, else Sturges bins over both samples (Evidently `get_binned_data`)."""
    values = np.unique(ref_N)
    if len(values) <= _MAX_CATEGORIES:
        values = np.union1d(values, cur_M)
        return (
            np.bincount(np.searchsorted(values, ref_N), minlength=len(values)),
            np.bincount(np.searchsorted(values, cur_M), minlength=len(values)),
        )
    edges = np.histogram_bin_edges(np.concatenate([ref_N, cur_M]), bins="sturges")
    return np.histogram(ref_N, edges)[0], np.histogram(cur_M, edges)[0]


# --- windows ----------------------------------------------------------------------------------


def _feature(window: dict, name: str, feature: str) -> np.ndarray:
    """The feature as an array, checked for dimension, emptiness, finiteness and sign."""
    x = np.asarray(window[feature])
    ndim = _NDIM.get(feature, 1)
    if x.ndim != ndim or x.size == 0:
        raise ValueError(f"{name} window: {feature} must be a non-empty {ndim}-D array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} window: {feature} has non-finite values")
    if feature in _COUNTS and (x.min() < 0 or x.sum() == 0):
        raise ValueError(f"{name} window: {feature} must be non-negative counts with a positive total")
    if feature == "expert_load" and np.any(x.sum(axis=1) == 0):
        raise ValueError(f"{name} window: expert_load layer {int(np.argmin(x.sum(axis=1)))} has no routed tokens")
    if feature == "embedding" and len(x) < 2:
        raise ValueError(f"{name} window: embedding needs at least 2 rows, got {len(x)}")
    return x


def _check_shapes(feature: str, ref: np.ndarray, cur: np.ndarray) -> None:
    """Histograms and expert loads must match exactly; embeddings in their dimension."""
    if feature in _COUNTS and ref.shape != cur.shape:
        raise ValueError(f"{feature}: reference shape {ref.shape} != current shape {cur.shape}")
    if feature == "embedding" and ref.shape[1] != cur.shape[1]:
        raise ValueError(f"embedding: reference dim {ref.shape[1]} != current dim {cur.shape[1]}")


def _run(feature: str, detector: str, ref: np.ndarray, cur: np.ndarray, cfg: DriftConfig) -> DriftResult:
    """One detector; distances alarm at score >= threshold, tests at p-value < threshold."""
    p_value = None
    if detector in ("psi", "chi2") and feature not in _COUNTS:
        ref, cur = bin_samples(ref, cur)
    if detector == "psi":
        score, threshold = psi(ref, cur), cfg.psi_threshold
    elif detector == "chi2":
        (score, p_value), threshold = chi2_homogeneity(ref, cur), cfg.chi2_p_value
    elif detector == "ks":
        (score, p_value), threshold = ks(ref, cur), cfg.ks_p_value
    elif detector == "wasserstein":
        score, threshold = wasserstein_normed(ref, cur), cfg.wasserstein_threshold
    elif detector == "js":
        score, threshold = js_max_over_layers(ref, cur), cfg.js_threshold
    else:
        score, p_value = mmd_permutation(ref, cur, num_permutations=cfg.mmd_permutations, seed=cfg.seed)
        threshold = cfg.mmd_p_value
    drifted = score >= threshold if p_value is None else p_value < threshold
    return DriftResult(feature, detector, score, threshold, drifted, p_value)


def compare_windows(reference: dict, current: dict, cfg: DriftConfig) -> list[DriftResult]:
    """Runs every detector of `DETECTORS` on every feature present in both windows.

    Args:
        reference: window of reference traffic (e.g. the ingestion profile or an earlier window).
        current: window of current traffic, same features and units.
        cfg: thresholds.

    Returns:
        One DriftResult per (feature, detector), in `DETECTORS` order.

    Raises:
        ValueError: naming the feature, for an unknown feature name, a malformed array, or shapes
            that cannot be compared (histogram length, expert-load (L, E), embedding dim).
    """
    for name, window in (("reference", reference), ("current", current)):
        unknown = sorted(set(window) - set(FEATURES))
        if unknown:
            raise ValueError(f"{name} window: unknown feature {unknown[0]}; known: {list(FEATURES)}")
    results: list[DriftResult] = []
    for feature, detectors in DETECTORS.items():
        if feature not in reference or feature not in current:
            continue
        ref = _feature(reference, "reference", feature)
        cur = _feature(current, "current", feature)
        _check_shapes(feature, ref, cur)
        results.extend(_run(feature, detector, ref, cur, cfg) for detector in detectors)
    return results


def summary(results: list[DriftResult]) -> dict[str, Any]:
    """JSON-able digest: {"drifted": any alarm, "drifted_features": [...], "features": {feature:
    {"drifted": any alarm on it, "detectors": {detector: score, threshold, p_value, drifted}}}}."""
    features: dict[str, Any] = {}
    for r in results:
        entry = features.setdefault(r.feature, {"drifted": False, "detectors": {}})
        record = asdict(r)
        del record["feature"], record["detector"]
        record["drifted"] = bool(r.drifted)
        entry["detectors"][r.detector] = record
        entry["drifted"] = entry["drifted"] or bool(r.drifted)
    drifted = [f for f, entry in features.items() if entry["drifted"]]
    return {"drifted": bool(drifted), "drifted_features": drifted, "features": features}
