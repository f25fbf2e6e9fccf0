"""From measured expert load to the one placement a serving app runs, and `placement.json`.

The EPLB policy (`deploy.eplb`) places every MoE layer on its own. The serving app
(`raymoe.serve.shard_workers`) holds one placement for all its MoE layers: each shard worker
keeps the same logical experts in every layer. Experts are all-to-all'd layer by layer in lockstep,
so a step's expert time is the sum over layers of that layer's busiest worker; the serving
placement is chosen to make that sum small (`shared_placement`):
1. Candidates: the policy's answer for the load summed over layers (every MoE layer routes the
   same tokens x top-k pairs, so the sum weighs layers equally; migration-aware against the
   running placement when that is known), each layer's own placement used for all layers, and
   the running placement. The one with the smallest sum of per-layer maxima is kept.
2. Swaps of two slots on different workers (within a node when the policy is hierarchical) while
   one lowers that sum by more than `min_gain_per_move` mean worker loads per expert sent.
3. Workers are renamed to match the running placement as closely as possible (fewest experts
   sent; renaming changes no load).
A running placement whose step imbalance (sum of per-layer maxima / sum of per-layer means) is
already within `target_imbalance` is kept as it is. The per-layer placements are computed as
well and kept in `placement.json`: they are what the simulator and the planner reason with, and
they show what one shared placement costs in balance.

`placement.json` (schema `raymoe.placement/v1`) is written atomically; `read_placement` checks it.

Legend: L MoE layers, E logical experts, P physical slots, W workers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raymoe.atomic_io import atomic_write_json
from raymoe.deploy.eplb import Policy, rebalance_experts
from raymoe.deploy.placement import Placement, check_load, moved_experts
from raymoe.parallel.layout import ExpertPlacement

PLACEMENT_SCHEMA = "raymoe.placement/v1"


@dataclass(kw_only=True)
class PlacementPlan:
    """A computed re-placement: the serving placement, the per-layer ones, and their balance."""

    load_LE: np.ndarray
    num_workers: int
    policy: str  # the Policy it was planned with, as recorded (a file may come from another version)
    serving: ExpertPlacement  # one placement for every MoE layer (what the app applies)
    per_layer: Placement  # the policy per layer (simulator, planner)
    current: ExpertPlacement | None = None  # the running placement, when known
    source: dict[str, Any] = field(default_factory=dict)  # where the load came from
    created: float = field(default_factory=time.time)

    @property
    def num_slots(self) -> int:
        return len(self.serving.slot_expert)

    def imbalance(self) -> dict[str, list[float] | None]:
        """(L,) max / mean worker load per layer on the measured load: under `contiguous` (one
        slot per expert, E / W per worker, no copies; None when W does not divide E), the running
        placement, the new serving placement and the per-layer policy."""
        tiled = _tiled(self.serving, self.num_layers)
        now = None if self.current is None else _tiled(self.current, self.num_layers).imbalance(self.load_LE)
        plain = None
        if self.serving.num_experts % self.num_workers == 0:
            contiguous = ExpertPlacement.contiguous(self.serving.num_experts, self.num_workers)
            plain = _tiled(contiguous, self.num_layers).imbalance(self.load_LE).tolist()
        return {
            "contiguous": plain,
            "current": None if now is None else now.tolist(),
            "serving": tiled.imbalance(self.load_LE).tolist(),
            "per_layer": self.per_layer.imbalance(self.load_LE).tolist(),
        }

    def step_imbalance(self) -> dict[str, float | None]:
        """`step_imbalance` of each placement of `imbalance` (all layers of a lockstep step)."""
        per_layer = self.per_layer.worker_load(self.load_LE)
        mean = per_layer.mean(axis=1).sum()
        contiguous = None
        if self.serving.num_experts % self.num_workers == 0:
            contiguous = step_imbalance(
                ExpertPlacement.contiguous(self.serving.num_experts, self.num_workers), self.load_LE
            )
        return {
            "contiguous": contiguous,
            "current": None if self.current is None else step_imbalance(self.current, self.load_LE),
            "serving": step_imbalance(self.serving, self.load_LE),
            "per_layer": float(per_layer.max(axis=1).sum() / mean) if mean > 0 else 1.0,
        }

    @property
    def num_layers(self) -> int:
        return self.load_LE.shape[0]

    def moved(self) -> int | None:
        """Expert copies the switch sends to workers, over all layers (None: no running placement)."""
        if self.current is None or len(self.current.slot_expert) != self.num_slots:
            return None
        return int(moved_experts(_tiled(self.current, self.num_layers), _tiled(self.serving, self.num_layers)).sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLACEMENT_SCHEMA,
            "created": self.created,
            "source": self.source,
            "num_experts": self.serving.num_experts,
            "num_workers": self.num_workers,
            "num_slots": self.num_slots,
            "policy": self.policy,
            "serving": {"slot_expert": list(self.serving.slot_expert), "reduced_by": "sum over layers"},
            "current": None if self.current is None else {"slot_expert": list(self.current.slot_expert)},
            "per_layer": {"phy2log": self.per_layer.phy2log.tolist()},
            "load": self.load_LE.astype(np.int64).tolist(),
            "imbalance": self.imbalance(),
            "step_imbalance": self.step_imbalance(),
            "moved_experts": self.moved(),
        }


def _tiled(placement: ExpertPlacement, num_layers: int) -> Placement:
    return Placement.from_expert_placements([placement] * num_layers)


def plan_placement(
    load_LE,
    *,
    num_workers: int,
    num_slots: int,
    current: ExpertPlacement | None = None,
    policy: Policy = "auto",
    num_groups: int = 1,
    num_nodes: int = 1,
    migration_aware: bool = True,
    target_imbalance: float = 1.1,
    min_gain_per_move: float = 0.0,
    source: dict | None = None,
) -> PlacementPlan:
    """The serving placement (policy on the load summed over layers) and the per-layer ones.

    Args:
        load_LE: (L, E) tokens routed per expert per MoE layer over the window (padding excluded).
        num_workers: the app's expert-parallel workers (`ep`).
        num_slots: physical slots per layer (E + redundant copies), split evenly over workers.
        current: the running placement; with `migration_aware` and the same slot count, the
            new one moves as few experts as reach `target_imbalance` (`deploy.eplb_migration`).
        policy, num_groups, num_nodes: as `deploy.eplb.rebalance_experts`.
        source: where the load came from (kept in placement.json).

    Raises:
        ValueError: sizes that cannot form a placement, or a current placement of another model.
    """
    load = np.array(load_LE, dtype=np.float64, ndmin=2)
    num_layers, num_experts = load.shape
    check_load(load, num_layers, num_experts)
    if current is not None and (current.num_experts != num_experts or current.ep != num_workers):
        raise ValueError(
            f"the running placement (num_experts={current.num_experts}, ep={current.ep}) does not "
            f"match the load's {num_experts} experts on {num_workers} workers"
        )
    kw: dict[str, Any] = dict(
        num_groups=num_groups,
        num_nodes=num_nodes,
        policy=policy,
        target_imbalance=target_imbalance,
        min_gain_per_move=min_gain_per_move,
    )
    # Migration-aware: start from the running placement (when its slot count still fits).
    running = current if migration_aware and current is not None and len(current.slot_expert) == num_slots else None
    per_layer = rebalance_experts(
        load, num_slots, num_workers, current=None if running is None else _tiled(running, num_layers), **kw
    )
    serving = shared_placement(load, per_layer, current=running, **kw)
    return PlacementPlan(
        load_LE=load,
        num_workers=num_workers,
        policy=policy,
        serving=serving,
        per_layer=per_layer,
        current=current,
        source=dict(source or {}),
    )


def step_imbalance(placement: ExpertPlacement, load_LE) -> float:
    """Sum over MoE layers of the busiest worker's load / sum of the mean worker loads: how much
    slower a lockstep step's expert time is than at perfect balance (1.0 = balanced)."""
    load = np.array(load_LE, dtype=np.float64, ndmin=2)
    worker_LW = _tiled(placement, load.shape[0]).worker_load(load)
    mean = worker_LW.mean(axis=1).sum()
    return float(worker_LW.max(axis=1).sum() / mean) if mean > 0 else 1.0


def shared_placement(
    load_LE: np.ndarray,
    per_layer: Placement,
    *,
    current: ExpertPlacement | None,
    num_groups: int,
    num_nodes: int,
    policy: Policy,
    target_imbalance: float,
    min_gain_per_move: float,
    max_evaluations: int = 20000,
) -> ExpertPlacement:
    """One placement for every MoE layer, making the sum of per-layer busiest-worker loads small
    (see the module docstring for the three stages).

    Args:
        load_LE: (L, E) measured load.
        per_layer: the policy's placement of each layer (its rows are candidates).
        current: the running placement, with the same slot count (None: unknown or resized).
        max_evaluations: bound on the swap stage's placements tried (it is O(slots^2) per pass).
    """
    from raymoe.deploy.eplb import resolve_policy
    from raymoe.deploy.eplb_migration import align_workers

    num_experts, num_workers = per_layer.num_experts, per_layer.num_workers
    num_slots = per_layer.num_slots
    if current is not None and step_imbalance(current, load_LE) <= target_imbalance:
        return current
    summed = rebalance_experts(
        load_LE.sum(axis=0, keepdims=True),
        num_slots,
        num_workers,
        num_groups=num_groups,
        num_nodes=num_nodes,
        policy=policy,
        target_imbalance=target_imbalance,
        min_gain_per_move=min_gain_per_move,
        current=None if current is None else Placement.from_expert_placements([current]),
    )
    rows = [summed.phy2log[0], *per_layer.phy2log] + ([np.array(current.slot_expert)] if current else [])
    cost = _StepCost(load_LE, num_experts, num_workers)
    best = min(rows, key=cost)
    _, nodes = resolve_policy(policy, num_groups, num_nodes)
    best = _swap_down(best, cost, num_workers, nodes, min_gain_per_move, max_evaluations)
    if current is not None:
        best = align_workers(np.array(current.slot_expert), best, num_workers, nodes)
    return ExpertPlacement(num_experts=num_experts, ep=num_workers, slot_expert=[int(e) for e in best])


class _StepCost:
    """Sum over layers of the busiest worker's tokens for a shared slot row (P,)."""

    def __init__(self, load_LE: np.ndarray, num_experts: int, num_workers: int):
        self.load = load_LE
        self.num_experts, self.num_workers = num_experts, num_workers
        self.mean_total = load_LE.sum() / num_workers  # sum over layers of the mean worker load

    def __call__(self, row: np.ndarray) -> float:
        per_copy = self.load / np.bincount(row, minlength=self.num_experts)
        worker_LW = per_copy[:, row].reshape(self.load.shape[0], self.num_workers, -1).sum(axis=2)
        return float(worker_LW.max(axis=1).sum())


def _swap_down(
    row: np.ndarray, cost: _StepCost, num_workers: int, num_nodes: int, min_gain_per_move: float, max_evaluations: int
) -> np.ndarray:
    """First-improvement swaps of two slots on different workers (same node), never putting two
    copies of one expert on one worker, while a swap lowers `cost` by more than
    2 x min_gain_per_move x the summed mean worker load (a swap sends two experts)."""
    row = np.array(row, dtype=np.int64)
    num_slots = len(row)
    per_worker = num_slots // num_workers
    per_node = num_slots // num_nodes
    best = cost(row)
    threshold = max(2 * min_gain_per_move * cost.mean_total, 1e-9 * max(best, 1.0))
    evaluations, improved = 0, True
    while improved and evaluations < max_evaluations:
        improved = False
        for a in range(num_slots):
            for b in range(a + 1, num_slots):
                wa, wb = a // per_worker, b // per_worker
                if wa == wb or a // per_node != b // per_node or row[a] == row[b]:
                    continue
                if (
                    row[a] in row[wb * per_worker : (wb + 1) * per_worker]
                    or row[b] in row[wa * per_worker : (wa + 1) * per_worker]
                ):
                    continue
                row[a], row[b] = row[b], row[a]
                evaluations += 1
                trial = cost(row)
                if trial < best - threshold:
                    best, improved = trial, True
                else:
                    row[a], row[b] = row[b], row[a]
                if evaluations >= max_evaluations:
                    return row
    return row


def write_placement(path: str | Path, plan: PlacementPlan) -> Path:
    """Writes `plan` as placement.json atomically."""
    return atomic_write_json(path, plan.to_dict())


def read_placement(path: str | Path) -> PlacementPlan:
    """Reads and checks a placement.json.

    Raises:
        ValueError: not JSON, another schema, or tables that do not form placements; the message
            names the file and the key.
    """
    name = str(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}: not a readable placement.json ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != PLACEMENT_SCHEMA:
        raise ValueError(
            f"{name}: schema {data.get('schema') if isinstance(data, dict) else None!r}, expected {PLACEMENT_SCHEMA!r}"
        )
    try:
        num_experts, num_workers = int(data["num_experts"]), int(data["num_workers"])
        serving = ExpertPlacement(
            num_experts=num_experts, ep=num_workers, slot_expert=[int(e) for e in data["serving"]["slot_expert"]]
        )
        current = data.get("current")
        current = (
            None
            if current is None
            else ExpertPlacement(
                num_experts=num_experts, ep=num_workers, slot_expert=[int(e) for e in current["slot_expert"]]
            )
        )
        per_layer = Placement.from_phy2log(data["per_layer"]["phy2log"], num_experts, num_workers)
        load = check_load(data["load"], per_layer.num_layers, num_experts)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {type(exc).__name__}: {exc}") from None
    return PlacementPlan(
        load_LE=load,
        num_workers=num_workers,
        policy=str(data.get("policy", "auto")),
        serving=serving,
        per_layer=per_layer,
        current=current,
        source=dict(data.get("source") or {}),
        created=float(data.get("created", 0.0)),
    )


def format_before_after(plan: PlacementPlan) -> str:
    """Markdown table: per MoE layer, max/mean worker load under the running placement, the new
    serving placement and the per-layer optimum; then the slots each worker holds before and after."""
    imb = plan.imbalance()

    def cell(key: str, layer: int) -> str:
        values = imb[key]
        return "" if values is None else f"{values[layer]:.3f}"

    rows = [
        f"max / mean worker load per MoE layer ({plan.num_workers} workers, {plan.num_slots} slots)",
        "",
        "| MoE layer | routed tokens | no copies (E / W per worker) | running | new (one for all layers) "
        "| per-layer policy |",
        "|---|---|---|---|---|---|",
    ]
    for layer in range(plan.num_layers):
        rows.append(
            f"| {layer} | {int(plan.load_LE[layer].sum())} | {cell('contiguous', layer)} | "
            f"{cell('current', layer)} | {cell('serving', layer)} | {cell('per_layer', layer)} |"
        )
    step = plan.step_imbalance()
    rows.append(
        "| all (step: sum of maxima / sum of means) | {} | {} | {} | {} | {} |".format(
            int(plan.load_LE.sum()),
            *("" if step[k] is None else f"{step[k]:.3f}" for k in ("contiguous", "current", "serving", "per_layer")),
        )
    )
    rows += ["", "| worker | running experts | new experts |", "|---|---|---|"]
    for w in range(plan.num_workers):
        now = "" if plan.current is None else plan.current.experts_of(w)
        rows.append(f"| {w} | {now} | {plan.serving.experts_of(w)} |")
    moved = plan.moved()
    rows.append("")
    rows.append(f"expert copies sent: {moved if moved is not None else 'n/a (no running placement of this size)'}")
    return "\n".join(rows)


def fit_experts(load_LE, num_experts: int) -> np.ndarray:
    """Pads a load read from Prometheus (which has series only for experts that got tokens) to
    `num_experts` columns; fails when it has more."""
    load = np.array(load_LE, dtype=np.int64, ndmin=2)
    if load.shape[1] > num_experts:
        raise ValueError(f"the load names expert {load.shape[1] - 1}, but the model has {num_experts} experts")
    return np.pad(load, ((0, 0), (0, num_experts - load.shape[1])))
