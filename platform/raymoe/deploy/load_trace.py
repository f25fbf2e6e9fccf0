"""Expert-load traces: tokens routed to each expert of each MoE layer, step after step.

The serving engine counts routed tokens per expert per MoE layer (`tokens_per_expert_LE`, padding
rows excluded); a trace is a run of those counts, one (L, E) array per serving step or per scrape
interval. On disk:
- `.npy`: one integer array of shape (T, L, E);
- `.jsonl`: one record per line, `{"tokens_per_expert": [[... E counts ...], ... L rows ...]}`;
  other keys (a timestamp, a step number) are ignored.
- a directory of the serving app's traffic windows (`app.traffic.output_dir`, Parquet files whose
  metadata holds the window's `expert_load`): the app records this trace as it serves
  (`windows_trace`); windows of several replicas that cover the same time are one step.
Prometheus exports the counts as counters; `from_cumulative` turns snapshots into per-interval
counts, and `prometheus_load` asks Prometheus for the counts over one window.

`zipf_trace` draws a synthetic trace whose expert popularity follows Zipf's law and drifts.

Legend: T steps, L MoE layers, E experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raymoe.atomic_io import atomic_write


def _check(trace: np.ndarray, where: str) -> np.ndarray:
    if trace.ndim != 3 or 0 in trace.shape:
        raise ValueError(f"{where}: expected a non-empty (steps, layers, experts) array, got shape {trace.shape}")
    if not np.issubdtype(trace.dtype, np.integer) and not np.all(np.mod(trace, 1) == 0):
        raise ValueError(f"{where}: token counts must be integers")
    if (trace < 0).any():
        step, layer, expert = np.argwhere(trace < 0)[0]
        raise ValueError(f"{where}: negative count at step {step}, layer {layer}, expert {expert}")
    return trace.astype(np.int64)


def read_trace(path: str | Path) -> np.ndarray:
    """(T, L, E) counts from a `.npy` or `.jsonl` trace file, or a directory of traffic windows.

    Raises:
        ValueError: naming the line (JSONL) or file (windows) and what is wrong with it.
    """
    path = Path(path)
    if path.is_dir():
        return windows_trace(path).trace_TLE
    if not path.is_file():
        raise ValueError(f"trace {str(path)!r} does not exist")
    if path.suffix == ".npy":
        return _check(np.load(path, allow_pickle=False), str(path))
    if path.suffix != ".jsonl":
        raise ValueError(f"trace {str(path)!r}: expected a .npy or .jsonl file")
    steps, shape = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            counts = np.asarray(json.loads(line)["tokens_per_expert"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f'{where}: expected {{"tokens_per_expert": [[...], ...]}} ({exc})') from None
        if counts.ndim != 2 or (shape is not None and counts.shape != shape):
            raise ValueError(
                f"{where}: tokens_per_expert has shape {counts.shape}, expected {shape or '(layers, experts)'}"
            )
        shape = counts.shape
        steps.append(counts)
    if not steps:
        raise ValueError(f"trace {str(path)!r} has no records")
    return _check(np.stack(steps), str(path))


def write_trace(path: str | Path, trace_TLE) -> Path:
    """Writes a `.jsonl` trace atomically (one record per step)."""
    trace = _check(np.asarray(trace_TLE), "trace")

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            for step in trace:
                fh.write(json.dumps({"tokens_per_expert": step.tolist()}) + "\n")

    return atomic_write(path, write)


def from_cumulative(snapshots_TLE) -> np.ndarray:
    """Per-interval counts from T cumulative snapshots (T - 1 intervals). A counter that went down
    was reset (the process restarted): that interval counts from zero."""
    snaps = np.asarray(snapshots_TLE, dtype=np.int64)
    if snaps.ndim != 3 or len(snaps) < 2:
        raise ValueError(f"expected >= 2 snapshots of shape (layers, experts), got shape {snaps.shape}")
    diff = np.diff(snaps, axis=0)
    return np.where(diff < 0, snaps[1:], diff)


def zipf_trace(
    *,
    num_steps: int,
    num_layers: int,
    num_experts: int,
    tokens_per_step: int,
    zipf_s: float = 1.0,
    drift_every: int = 0,
    drift_swaps: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """A synthetic (T, L, E) trace: expert popularity ~ 1 / rank**zipf_s, ranks shuffled per layer.

    Args:
        tokens_per_step: routed (token, expert) pairs per layer per step, drawn multinomially.
        drift_every: every this many steps (0 = never), `drift_swaps` random pairs of experts
            trade popularity in each layer.
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_experts + 1) ** zipf_s
    weights /= weights.sum()
    rank = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])  # (L, E): rank of expert
    trace = np.empty((num_steps, num_layers, num_experts), dtype=np.int64)
    for step in range(num_steps):
        if drift_every and step and step % drift_every == 0:
            for layer in range(num_layers):
                for _ in range(drift_swaps):
                    i, j = rng.choice(num_experts, size=2, replace=False)
                    rank[layer, [i, j]] = rank[layer, [j, i]]
        for layer in range(num_layers):
            trace[step, layer] = rng.multinomial(tokens_per_step, weights[rank[layer]])
    return trace


@dataclass(frozen=True)
class WindowsLoad:
    """Expert load read from traffic windows: the counts, the files used, the files skipped."""

    trace_TLE: np.ndarray  # one step per time span (windows of several replicas summed)
    files: list[str]
    skipped: dict[str, str]  # unreadable file -> why

    @property
    def load_LE(self) -> np.ndarray:
        """Tokens per expert per layer over all the windows read."""
        return self.trace_TLE.sum(axis=0)


def windows_trace(directory: str | Path, latest: int = 0) -> WindowsLoad:
    """The serving app's traffic windows in `directory` as a trace.

    Windows are taken in order of their end time (`raymoe.monitor.traffic_windows.list_windows`);
    a window that starts before the current step's first window ends (another replica's window of
    about the same span) joins that step, otherwise it starts a new step. Unreadable windows and windows without expert
    counts (an app that has not routed a token yet) are skipped and reported, not dropped silently.

    Args:
        directory: `app.traffic.output_dir` of the serving app.
        latest: use only the newest this-many window files (0 = all).

    Raises:
        ValueError: no readable window with expert counts, or windows of different shapes.
    """
    from raymoe.monitor.traffic_windows import list_windows, read_window

    files = list_windows(directory)
    if latest:
        files = files[-latest:]
    steps: list[np.ndarray] = []
    used, skipped = [], {}
    step_end = None
    shape = None
    for path in files:
        try:
            window = read_window(path)
        except ValueError as exc:
            skipped[str(path)] = str(exc)
            continue
        load = window.features["expert_load"]
        if load.size == 0:
            skipped[str(path)] = "no expert counts in the window"
            continue
        if shape is not None and load.shape != shape:
            raise ValueError(f"{path}: expert_load has shape {load.shape}, earlier windows {shape}")
        shape = load.shape
        if step_end is not None and window.meta["start"] < step_end:
            steps[-1] = steps[-1] + load
        else:
            steps.append(load.astype(np.int64))
            step_end = window.meta["end"]
        used.append(str(path))
    if not steps:
        why = f" ({len(skipped)} skipped: {next(iter(skipped.values()))})" if skipped else ""
        raise ValueError(f"{directory}: no traffic window with expert counts{why}")
    return WindowsLoad(trace_TLE=_check(np.stack(steps), str(directory)), files=used, skipped=skipped)


PROMETHEUS_METRIC = "ray_raymoe_serve_tokens_per_expert_total"


def prometheus_query(model: str, window: str) -> str:
    """PromQL for tokens per (layer, expert) over the last `window` (e.g. "1h"), all replicas."""
    selector = f'{{model="{model}"}}' if model else ""
    return f"sum by (layer, expert) (increase({PROMETHEUS_METRIC}{selector}[{window}]))"


def prometheus_load(url: str, window: str, *, model: str = "", timeout_s: float = 30.0) -> np.ndarray:
    """(L, E) tokens routed per expert per MoE layer over the last `window`, from Prometheus'
    HTTP API (`/api/v1/query`); counter resets are handled by `increase`. Padding is not in the
    counter (the engine counts real tokens only).

    Raises:
        ValueError: Prometheus unreachable or answering an error, or no series.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    query = prometheus_query(model, window)
    address = f"{url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(address, timeout=timeout_s) as reply:
            body = json.loads(reply.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ValueError(f"prometheus.url {url!r}: query failed ({exc})") from None
    return load_from_prometheus_result(body, query)


def load_from_prometheus_result(body: dict, query: str = "") -> np.ndarray:
    """(L, E) counts from a Prometheus `/api/v1/query` answer of `prometheus_query` (a vector with
    `layer` and `expert` labels); missing (layer, expert) pairs count 0."""
    if body.get("status") != "success":
        raise ValueError(f"prometheus answered {body.get('errorType', 'an error')}: {body.get('error', body)}")
    series = body.get("data", {}).get("result", [])
    if not series:
        raise ValueError(f"prometheus has no series for {query or 'the query'} (no routed tokens in the window?)")
    cells = {}
    for s in series:
        try:
            cells[int(s["metric"]["layer"]), int(s["metric"]["expert"])] = float(s["value"][1])
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"prometheus series without integer layer/expert labels: {s} ({exc})") from None
    layers = 1 + max(layer for layer, _ in cells)
    experts = 1 + max(expert for _, expert in cells)
    load = np.zeros((layers, experts), dtype=np.int64)
    for (layer, expert), value in cells.items():
        # increase() extrapolates to the window's edges, so counts come back fractional.
        load[layer, expert] = max(0, round(value))
    return load
