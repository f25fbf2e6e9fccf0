"""Expert-load traces: tokens routed to each expert of each MoE layer, step after step.

The serving engine counts routed tokens per expert per MoE layer (`tokens_per_expert_LE`, padding
rows excluded); a trace is a run of those counts, one (L, E) array per serving step or per scrape
interval. On disk:
- `.npy`: one integer array of shape (T, L, E);
- `.jsonl`: one record per line, `{"tokens_per_expert": [[... E counts ...], ... L rows ...]}`;
  other keys (a timestamp, a step number) are ignored.
Prometheus exports the counts as counters; `from_cumulative` turns snapshots into per-interval
counts.

`zipf_trace` draws a synthetic trace whose expert popularity follows Zipf's law and drifts.

Legend: T steps, L MoE layers, E experts.
"""

from __future__ import annotations

import json
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
    """(T, L, E) counts from a `.npy` or `.jsonl` trace file.

    Raises:
        ValueError: naming the line (JSONL) and what is wrong with it.
    """
    path = Path(path)
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
            raise ValueError(f"{where}: expected {{\"tokens_per_expert\": [[...], ...]}} ({exc})") from None
        if counts.ndim != 2 or (shape is not None and counts.shape != shape):
            raise ValueError(f"{where}: tokens_per_expert has shape {counts.shape}, expected "
                             f"{shape or '(layers, experts)'}")
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


def zipf_trace(*, num_steps: int, num_layers: int, num_experts: int, tokens_per_step: int,
               zipf_s: float = 1.0, drift_every: int = 0, drift_swaps: int = 0, seed: int = 0) -> np.ndarray:
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
