"""Matplotlib figures for people without Grafana: training curves, the expert-load heatmap, drift
scores over time, and reference-vs-current window comparisons for the drift report.

Every function builds a `matplotlib.figure.Figure` on its own Agg canvas and never touches pyplot:
pyplot keeps a global registry of open figures (a leak in a long-lived process) and may pick a GUI
backend; a bare Figure is garbage-collected like any object and renders headless. `png_bytes`
renders one at `dpi` without tight cropping, so a PNG is exactly figure size x dpi pixels.

Shapes: L MoE layers, E experts, N reference rows, M current rows, D embedding dim, V vocab size.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
from matplotlib import dates as mdates
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator

DPI = 100
REFERENCE_COLOR, CURRENT_COLOR, ALARM_COLOR = "tab:blue", "tab:orange", "tab:red"
# A p-value of exactly 0 (float underflow of an enormous shift) has no place on a log axis.
P_VALUE_FLOOR = 1e-16

# {panel y-label: {series label: (x values, y values)}}
Panels = Mapping[str, Mapping[str, tuple[Sequence[Any], Sequence[float]]]]


def new_figure(width_in: float, height_in: float) -> Figure:
    """A Figure of `width_in` x `height_in` inches on an Agg canvas (constrained layout)."""
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes, exactly (width_in * dpi) x (height_in * dpi) pixels."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def utc_datetimes(unix_s: Sequence[float]) -> list[datetime]:
    """Unix seconds -> timezone-aware UTC datetimes (matplotlib draws them as dates)."""
    return [datetime.fromtimestamp(t, tz=UTC) for t in unix_s]


def _date_axis(ax) -> None:
    # Few ticks: the drift-score panels are about 3 inches wide.
    locator = mdates.AutoDateLocator(minticks=2, maxticks=4)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))


def _integer_ticks(ax, num_experts: int, num_layers: int) -> None:
    """Ticks on heatmap cells (imshow's default puts some between cells)."""
    for axis, n in ((ax.xaxis, num_experts), (ax.yaxis, num_layers)):
        # Every cell up to 32; beyond that every few cells keeps the labels legible.
        axis.set_major_locator(MaxNLocator(integer=True) if n > 32 else FixedLocator(range(n)))


# --- run report -------------------------------------------------------------------------------


def line_figure(panels: Panels, *, title: str, xlabel: str, dates: bool = False) -> Figure:
    """Stacked line panels sharing the x axis, one per y quantity.

    Args:
        panels: {y-label with its unit: {series label: (x, y)}}; x may be numbers or datetimes.
        title: figure title.
        xlabel: x-axis label with its unit (e.g. "step", "time (UTC)").
        dates: x values are datetimes (`utc_datetimes`); label them as UTC dates.
    """
    fig = new_figure(8.0, 1.0 + 2.6 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, series) in zip(axes, panels.items()):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o" if len(y) < 30 else None, markersize=3, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
    if dates:
        _date_axis(axes[-1])
    else:  # steps and rounds: no 2.5
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel(xlabel)
    fig.suptitle(title)
    return fig


def expert_load_figure(counts_LE: np.ndarray, *, title: str, unit: str = "tokens") -> Figure:
    """Heatmap of routed tokens per (MoE layer, expert); the image holds `counts_LE` unchanged.

    Args:
        counts_LE: (L, E) tokens routed to each expert of each MoE layer.
        title: figure title (say which step or window the counts are from).
        unit: colour-bar label.
    """
    counts_LE = np.asarray(counts_LE)
    num_layers, num_experts = counts_LE.shape
    fig = new_figure(min(2.0 + 0.45 * num_experts, 16.0), min(1.5 + 0.4 * num_layers, 12.0))
    ax = fig.subplots()
    image = ax.imshow(counts_LE, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label=unit)
    _integer_ticks(ax, num_experts, num_layers)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (index among MoE layers)")
    ax.set_title(title)
    return fig


def drift_scores_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """One panel per (feature, detector) over time, with its alarm threshold dashed.

    Tests (a `p_value` in the record: chi2, ks, mmd) plot the p-value on a log axis, alarm below
    the threshold; distances (psi, wasserstein, js) plot the score, alarm at or above it. Points
    that alarmed are red. Thresholds are drawn per point, so a changed config shows as a step.

    Args:
        history: [{"time": unix s, "summary": `raymoe.monitor.drift.summary()` output}, ...].
    """
    pairs: dict[tuple[str, str], list[tuple[float, Mapping[str, Any]]]] = {}
    for record in sorted(history, key=lambda r: r["time"]):
        for feature, entry in record["summary"]["features"].items():
            for detector, result in entry["detectors"].items():
                pairs.setdefault((feature, detector), []).append((record["time"], result))
    if not pairs:
        raise ValueError("drift history holds no detector result to plot")
    ncols = min(4, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig = new_figure(3.4 * ncols, 0.6 + 2.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, ((feature, detector), points) in zip(axes, pairs.items()):
        times = utc_datetimes([t for t, _ in points])
        is_test = points[-1][1].get("p_value") is not None
        if is_test:
            values = [max(r["p_value"], P_VALUE_FLOOR) for _, r in points]
            ax.set_yscale("log")
            ax.set_ylabel("p-value (alarm below)")
        else:
            values = [r["score"] for _, r in points]
            ax.set_ylabel("score (alarm at/above)")
        ax.plot(times, values, marker="o", markersize=3, color=REFERENCE_COLOR)
        ax.plot(times, [r["threshold"] for _, r in points], linestyle="--", color="grey")
        alarms = [(t, v) for t, v, (_, r) in zip(times, values, points) if r["drifted"]]
        if alarms:
            ax.scatter(*zip(*alarms), color=ALARM_COLOR, zorder=3)
        ax.set_title(f"{feature} / {detector}", fontsize="medium")
        ax.grid(alpha=0.3)
        _date_axis(ax)
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    fig.suptitle("Drift scores over time (UTC)")
    return fig


def drift_scores_png(history: Sequence[Mapping[str, Any]], *, dpi: int = DPI) -> bytes:
    """`drift_scores_figure` as PNG bytes."""
    return png_bytes(drift_scores_figure(history), dpi)


# --- reference vs current window (drift report) -----------------------------------------------


def shared_bin_edges(ref_N: np.ndarray, cur_M: np.ndarray, max_bins: int = 40) -> np.ndarray:
    """Histogram edges covering both samples: one bin per integer when integer-valued and at most
    `max_bins` values wide, else numpy's "auto" bin count capped at `max_bins`."""
    both = np.concatenate([ref_N, cur_M]).astype(np.float64)
    lo, hi = float(both.min()), float(both.max())
    if lo == hi:
        return np.array([lo - 0.5, hi + 0.5])
    if np.all(both == np.round(both)) and hi - lo + 1 <= max_bins:
        return np.arange(lo - 0.5, hi + 1.0)
    auto = len(np.histogram_bin_edges(both, bins="auto")) - 1
    return np.histogram_bin_edges(both, bins=min(auto, max_bins))


def histogram_figure(ref_N: np.ndarray, cur_M: np.ndarray, *, title: str, xlabel: str) -> Figure:
    """Reference and current samples as shares per shared bin (windows differ in size)."""
    ref_N, cur_M = np.asarray(ref_N, dtype=np.float64), np.asarray(cur_M, dtype=np.float64)
    edges = shared_bin_edges(ref_N, cur_M)
    fig = new_figure(7.0, 3.6)
    ax = fig.subplots()
    windows = ((ref_N, "reference", REFERENCE_COLOR), (cur_M, "current", CURRENT_COLOR))
    for sample, label, color in windows:
        counts = np.histogram(sample, edges)[0]
        ax.stairs(counts / len(sample), edges, label=f"{label} (n={len(sample)})", color=color, linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of rows")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def count_shares_figure(
    ref_K: np.ndarray, cur_K: np.ndarray, *, title: str, xlabel: str, ylabel: str, max_buckets: int = 32
) -> Figure:
    """Shares of two count vectors over the same K bins (token ids, length bins), merged into at
    most `max_buckets` contiguous buckets, reference and current side by side.

    Args:
        ref_K, cur_K: counts per bin, same length.
        xlabel: what a bin index is; ticks show each bucket's first index.
        ylabel: what the shares are of (e.g. "share of tokens").
    """
    ref_K, cur_K = np.asarray(ref_K, dtype=np.float64), np.asarray(cur_K, dtype=np.float64)
    # First bin of each bucket: array_split's near-equal contiguous split of the K bins.
    buckets = np.array_split(np.arange(len(ref_K)), min(max_buckets, len(ref_K)))
    starts = np.array([b[0] for b in buckets])
    ref_B = np.add.reduceat(ref_K, starts) / ref_K.sum()
    cur_B = np.add.reduceat(cur_K, starts) / cur_K.sum()
    fig = new_figure(9.0, 3.6)
    ax = fig.subplots()
    x = np.arange(len(starts))
    ax.bar(x - 0.2, ref_B, width=0.4, label="reference", color=REFERENCE_COLOR)
    ax.bar(x + 0.2, cur_B, width=0.4, label="current", color=CURRENT_COLOR)
    ax.set_xticks(x, [str(s) for s in starts], rotation=90, fontsize="x-small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # Outside the axes: the bars fill them to the top.
    fig.legend(loc="outside upper right", ncols=2, fontsize="small")
    return fig


def expert_share_figure(ref_LE: np.ndarray, cur_LE: np.ndarray) -> Figure:
    """Per-layer expert-load shares: reference, current (one colour scale) and current - reference."""
    ref_LE = np.asarray(ref_LE, dtype=np.float64)
    cur_LE = np.asarray(cur_LE, dtype=np.float64)
    ref_LE = ref_LE / ref_LE.sum(axis=1, keepdims=True)
    cur_LE = cur_LE / cur_LE.sum(axis=1, keepdims=True)
    diff_LE = cur_LE - ref_LE
    num_layers, num_experts = ref_LE.shape
    fig = new_figure(min(3.0 + 1.2 * num_experts, 18.0), min(1.8 + 0.35 * num_layers, 10.0))
    axes = fig.subplots(1, 3, sharey=True)
    top = max(ref_LE.max(), cur_LE.max())
    for ax, data, name in ((axes[0], ref_LE, "reference"), (axes[1], cur_LE, "current")):
        image = ax.imshow(data, aspect="auto", interpolation="nearest", vmin=0, vmax=top)
        ax.set_title(f"{name} share")
    fig.colorbar(image, ax=axes[:2], label="share of the layer's tokens")
    span = max(float(np.abs(diff_LE).max()), 1e-12)
    image = axes[2].imshow(diff_LE, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-span, vmax=span)
    axes[2].set_title("current - reference")
    fig.colorbar(image, ax=axes[2], label="share difference")
    for ax in axes:
        _integer_ticks(ax, num_experts, num_layers)
        ax.set_xlabel("expert")
    axes[0].set_ylabel("MoE layer")
    return fig


def pca_2d(ref_ND: np.ndarray, cur_MD: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both windows projected on the top two principal axes of the pooled, centred sample.

    Returns:
        (ref_N2, cur_M2, explained_2): coordinates and each axis's share of the pooled variance;
        a missing second axis (D = 1) is a zero column with share 0.
    """
    pooled = np.concatenate([ref_ND, cur_MD]).astype(np.float64)
    centred = pooled - pooled.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[:2].T
    variance = s**2
    explained = variance[:2] / max(variance.sum(), 1e-300)
    if proj.shape[1] < 2:
        proj = np.column_stack([proj, np.zeros(len(proj))])
        explained = np.append(explained, 0.0)
    return proj[: len(ref_ND)], proj[len(ref_ND) :], explained


def embedding_pca_figure(ref_ND: np.ndarray, cur_MD: np.ndarray) -> Figure:
    """Scatter of both windows' embeddings on the pooled sample's first two principal axes."""
    ref_N2, cur_M2, explained = pca_2d(np.asarray(ref_ND), np.asarray(cur_MD))
    fig = new_figure(6.0, 5.0)
    ax = fig.subplots()
    ax.scatter(ref_N2[:, 0], ref_N2[:, 1], s=8, alpha=0.5, color=REFERENCE_COLOR, label=f"reference (n={len(ref_N2)})")
    ax.scatter(cur_M2[:, 0], cur_M2[:, 1], s=8, alpha=0.5, color=CURRENT_COLOR, label=f"current (n={len(cur_M2)})")
    ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)")
    ax.set_title("Embeddings, 2-D PCA of both windows")
    ax.legend(fontsize="small")
    return fig
