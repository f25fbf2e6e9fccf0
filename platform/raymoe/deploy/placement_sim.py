"""Replay an expert-load trace under re-placement strategies and compare them.

Strategies (all start from plain EPLB on the first `window_steps` steps, which are not scored):
- `static`: never re-place;
- `periodic`: every `every_steps` steps, plain EPLB on the last window (a fixed interval and a
  fresh placement, as vLLM's `EPLBConfig.step_interval` over `window_size` steps and SGLang's
  "Periodic Rebalancing" do);
- `drift`: every `check_every_steps` steps, measure the running placement's max/mean worker load
  over the last window; above `drift_imbalance`, re-place migration-aware to `target_imbalance`.

Time model of one step (all workers in lockstep, as in expert-parallel decode; the slowest worker
of each MoE layer sets its time):
    step_s = overhead_s + seconds_per_token * sum_l max_w tokens(l, w) + seconds_per_moved_expert * moved
where `moved` counts expert copies sent to workers at that step (the copy is taken to stall the
step; SGLang stages weights in the background, which makes this an upper bound on the cost).

Reported per strategy: mean max/mean worker load, SLO attainment (share of steps with
step_s <= slo_step_s), worker-hours (workers x total seconds / 3600), p99 step time, experts moved,
re-placements.

Legend: T steps, L MoE layers, E experts, W workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from raymoe.config import require
from raymoe.deploy.eplb import Policy, rebalance_experts
from raymoe.deploy.placement import Placement, moved_experts

Strategy = Literal["static", "periodic", "drift"]
STRATEGIES: tuple[Strategy, ...] = ("static", "periodic", "drift")


@dataclass(kw_only=True)
class SimConfig:
    """Placement sizes, strategy knobs and the step-time model."""

    num_workers: int
    num_slots: int
    num_groups: int = 1
    num_nodes: int = 1
    policy: Policy = "auto"
    # Steps of load a placement is computed from (the first window is the warm-up).
    window_steps: int = 50
    every_steps: int = 200
    check_every_steps: int = 10
    drift_imbalance: float = 1.25
    target_imbalance: float = 1.1
    # Expert time per routed token per MoE layer on one worker.
    seconds_per_token: float
    # Per step: attention, dense layers, all-to-all not hidden behind the experts.
    overhead_s: float
    # Stall per expert copy sent (weights bytes / link bandwidth).
    seconds_per_moved_expert: float
    # TPOT target for one step.
    slo_step_s: float

    def __post_init__(self) -> None:
        for key in ("window_steps", "every_steps", "check_every_steps"):
            require(getattr(self, key) >= 1, f"sim.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("seconds_per_token", "overhead_s", "seconds_per_moved_expert"):
            require(getattr(self, key) >= 0, f"sim.{key} must be >= 0, got {getattr(self, key)}")
        require(self.slo_step_s > 0, f"sim.slo_step_s must be > 0, got {self.slo_step_s}")
        require(
            self.drift_imbalance >= 1 and self.target_imbalance >= 1,
            "sim.drift_imbalance and sim.target_imbalance must be >= 1",
        )


@dataclass(frozen=True)
class SimResult:
    strategy: str
    mean_imbalance: float  # mean over scored steps of sum_l max_w load / sum_l mean_w load
    slo_attainment: float
    worker_hours: float
    p99_step_ms: float
    experts_moved: int
    replacements: int

    def row(self) -> list:
        return [
            self.strategy,
            round(self.mean_imbalance, 3),
            f"{self.slo_attainment:.1%}",
            round(self.worker_hours, 4),
            round(self.p99_step_ms, 2),
            self.experts_moved,
            self.replacements,
        ]


HEADER = [
    "strategy",
    "max/mean worker load",
    "SLO attainment",
    "worker-hours",
    "p99 step ms",
    "experts moved",
    "re-placements",
]


def _place(cfg: SimConfig, load_LE: np.ndarray, current: Placement | None = None) -> Placement:
    return rebalance_experts(
        load_LE,
        cfg.num_slots,
        cfg.num_workers,
        num_groups=cfg.num_groups,
        num_nodes=cfg.num_nodes,
        policy=cfg.policy,
        current=current,
        target_imbalance=cfg.target_imbalance,
    )


def simulate(trace_TLE, cfg: SimConfig, strategy: Strategy) -> SimResult:
    """Replays `trace_TLE` (T, L, E) under one strategy."""
    trace = np.asarray(trace_TLE, dtype=np.float64)
    num_steps = trace.shape[0]
    require(
        num_steps > cfg.window_steps,
        f"trace has {num_steps} steps; needs more than sim.window_steps={cfg.window_steps}",
    )
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    placement = _place(cfg, trace[: cfg.window_steps].sum(axis=0))
    step_s, ratios = [], []
    moved_total = replacements = 0
    for t in range(cfg.window_steps, num_steps):
        since = t - cfg.window_steps
        recent = trace[t - cfg.window_steps : t].sum(axis=0)
        new = None
        if strategy == "periodic" and since and since % cfg.every_steps == 0:
            new = _place(cfg, recent)
        elif (
            strategy == "drift"
            and since
            and since % cfg.check_every_steps == 0
            and placement.imbalance(recent).max() > cfg.drift_imbalance
        ):
            new = _place(cfg, recent, current=placement)
        moved = 0
        if new is not None:
            moved = int(moved_experts(placement, new).sum())
            placement, moved_total, replacements = new, moved_total + moved, replacements + 1
        worker = placement.worker_load(trace[t])
        busiest = worker.max(axis=1).sum()
        ratios.append(busiest / max(worker.mean(axis=1).sum(), 1e-12))
        step_s.append(cfg.overhead_s + cfg.seconds_per_token * busiest + cfg.seconds_per_moved_expert * moved)
    step_times = np.array(step_s)
    return SimResult(
        strategy=strategy,
        mean_imbalance=float(np.mean(ratios)),
        slo_attainment=float(np.mean(step_times <= cfg.slo_step_s)),
        worker_hours=float(cfg.num_workers * step_times.sum() / 3600),
        p99_step_ms=float(np.percentile(step_times, 99) * 1e3),
        experts_moved=moved_total,
        replacements=replacements,
    )


def compare(trace_TLE, cfg: SimConfig) -> list[SimResult]:
    """`simulate` under every strategy, in STRATEGIES order."""
    return [simulate(trace_TLE, cfg, strategy) for strategy in STRATEGIES]
