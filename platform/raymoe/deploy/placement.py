"""Expert placement as per-layer tables, the load it puts on each worker, and the moves between two.

The tables are the ones DeepSeek's EPLB returns (github.com/deepseek-ai/EPLB): `phy2log` (the
logical expert in each physical slot), `log2phy` (the slots of each logical expert) and `logcnt`
(copies per logical expert). Slots split over workers as in `raymoe.parallel.layout.ExpertPlacement`:
worker w owns slots w*S .. (w+1)*S - 1, so one layer's `phy2log` row is an `ExpertPlacement`'s
`slot_expert` list.

Load model: a logical expert's tokens split evenly over its copies (routing picks a copy per token
uniformly), so a slot carries load[e] / logcnt[e] and a worker the sum over its slots.

Legend: L MoE layers, E logical experts, P physical slots, W workers, S slots per worker (P / W),
R most copies of one expert.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from raymoe.parallel.layout import ExpertPlacement


@dataclass(frozen=True)
class Placement:
    """Slot tables for every MoE layer; build with `Placement.from_phy2log`."""

    phy2log: np.ndarray  # (L, P) int64: logical expert held by each physical slot
    log2phy: np.ndarray  # (L, E, R) int64: slots of each logical expert, ascending, -1 padded
    logcnt: np.ndarray  # (L, E) int64: copies of each logical expert
    num_workers: int

    @classmethod
    def from_phy2log(cls, phy2log_LP, num_experts: int, num_workers: int) -> Placement:
        """Builds and checks the tables from `phy2log` (a (P,) row is taken as one layer).

        Raises:
            ValueError: a slot holds an id outside 0..E-1, an expert has no slot, or the slots do
                not split evenly over the workers.
        """
        phy2log = np.array(phy2log_LP, dtype=np.int64, ndmin=2)
        num_layers, num_slots = phy2log.shape
        if num_workers < 1 or num_slots % num_workers:
            raise ValueError(f"{num_slots} slots do not split evenly over num_workers={num_workers}")
        if phy2log.min(initial=0) < 0 or phy2log.max(initial=0) >= num_experts:
            raise ValueError(f"phy2log holds expert ids outside 0..{num_experts - 1}")
        logcnt = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
        missing = np.argwhere(logcnt == 0)
        if len(missing):
            layer, expert = missing[0]
            raise ValueError(
                f"layer {layer}: logical expert {expert} has no slot "
                f"({len(missing)} expert-layers without a slot in all)"
            )
        log2phy = np.full((num_layers, num_experts, int(logcnt.max())), -1, dtype=np.int64)
        for layer, row in enumerate(phy2log):
            filled = np.zeros(num_experts, dtype=np.int64)
            for slot, expert in enumerate(row):
                log2phy[layer, expert, filled[expert]] = slot
                filled[expert] += 1
        return cls(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt, num_workers=num_workers)

    @classmethod
    def from_expert_placements(cls, placements: list[ExpertPlacement]) -> Placement:
        """One `raymoe.parallel` placement per MoE layer -> tables (all must share E and ep)."""
        first = placements[0]
        if any(p.num_experts != first.num_experts or p.ep != first.ep for p in placements):
            raise ValueError("placements of different layers disagree on num_experts or ep")
        return cls.from_phy2log([p.slot_expert for p in placements], first.num_experts, first.ep)

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    @property
    def slots_per_worker(self) -> int:
        return self.num_slots // self.num_workers

    def worker_experts(self, layer: int, worker: int) -> list[int]:
        """Logical experts in `worker`'s slots of `layer`, in slot order."""
        s = self.slots_per_worker
        return self.phy2log[layer, worker * s : (worker + 1) * s].tolist()

    def to_expert_placement(self, layer: int) -> ExpertPlacement:
        """The `raymoe.parallel` placement of one layer (ep = num_workers)."""
        return ExpertPlacement(
            num_experts=self.num_experts, ep=self.num_workers, slot_expert=self.phy2log[layer].tolist()
        )

    def slot_load(self, load_LE) -> np.ndarray:
        """(L, P) tokens each slot receives when `load_LE` tokens go to the logical experts."""
        load = check_load(load_LE, self.num_layers, self.num_experts)
        per_copy = load / self.logcnt
        return np.take_along_axis(per_copy, self.phy2log, axis=1)

    def worker_load(self, load_LE) -> np.ndarray:
        """(L, W) tokens each worker receives."""
        return self.slot_load(load_LE).reshape(self.num_layers, self.num_workers, -1).sum(-1)

    def imbalance(self, load_LE) -> np.ndarray:
        """(L,) max / mean worker load per layer (1.0 = perfectly balanced; 1.0 for an idle layer)."""
        worker = self.worker_load(load_LE)
        mean = worker.mean(axis=1)
        return np.where(mean > 0, worker.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


def check_load(load_LE, num_layers: int, num_experts: int) -> np.ndarray:
    """`load_LE` as float64 (L, E), after checking its shape and that counts are finite and >= 0."""
    load = np.array(load_LE, dtype=np.float64, ndmin=2)
    if load.shape != (num_layers, num_experts):
        raise ValueError(f"load has shape {load.shape}, expected (layers, experts) = ({num_layers}, {num_experts})")
    if (load < 0).any() or not np.isfinite(load).all():
        raise ValueError("load must be finite token counts >= 0")
    return load


def moved_experts(old: Placement, new: Placement) -> np.ndarray:
    """(L,) expert copies that must be sent to a worker to go from `old` to `new`.

    A copy counts once for each worker that holds it in `new` but not in `old` (its weights cross
    the network); reordering the slots of one worker is free.
    """
    if old.phy2log.shape != new.phy2log.shape or old.num_workers != new.num_workers:
        raise ValueError(
            f"placements differ in shape: {old.phy2log.shape} x {old.num_workers} "
            f"workers vs {new.phy2log.shape} x {new.num_workers}"
        )
    moved = np.zeros(old.num_layers, dtype=np.int64)
    for layer in range(old.num_layers):
        for w in range(old.num_workers):
            arrived = Counter(new.worker_experts(layer, w)) - Counter(old.worker_experts(layer, w))
            moved[layer] += sum(arrived.values())
    return moved
