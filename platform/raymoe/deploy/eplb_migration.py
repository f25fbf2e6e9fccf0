"""Migration-aware re-placement: reach a target balance from the running placement, moving few experts.

Recomputing a placement from scratch (plain EPLB) balances well but reshuffles almost every slot,
and each expert copy that lands on a new worker is weights sent over the network (DeepSeek-V3:
44 MB per expert per layer in FP8). SGLang's large-scale-EP write-up (lmsys.org blog, 2025-05-05,
"Periodic Rebalancing") names the reload cost as what limits how often one can rebalance.

Per layer, this module tries two ways and keeps the cheaper one that meets the target:
1. local search from the current placement: apply, one at a time, the slot rewrite (a redundant
   copy becomes a copy of another expert: 1 expert sent) or the swap of two slots on different
   workers (2 experts sent) that removes the most excess load per expert sent, until every worker
   is within `target_imbalance` x the mean, or no move gains at least `min_gain_per_move`;
2. the fresh placement with its workers renamed to match the current ones as closely as possible
   (an assignment problem, solved exactly; within nodes when the policy is hierarchical).
Excess load = sum over workers of max(0, load - target x mean).

Legend: E logical experts, P physical slots, W workers, S slots per worker, C candidate slots.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from raymoe.deploy.placement import Placement, moved_experts


def rebalance_from(
    load_LE: np.ndarray,
    current: Placement,
    fresh: Placement,
    *,
    num_groups: int,
    num_nodes: int,
    target_imbalance: float,
    min_gain_per_move: float,
) -> Placement:
    """The placement, per layer, that meets `target_imbalance` with the fewest experts sent.

    Args:
        load_LE: (L, E) measured load.
        current: the running placement.
        fresh: plain EPLB's placement for the same load and sizes.
        num_groups, num_nodes: the policy's groups and nodes ((1, 1) for the global policy).
        target_imbalance: max / mean worker load to reach; where plain EPLB's placement is less
            balanced than this, its balance is the target instead.
        min_gain_per_move: least excess load (in mean worker loads) a local-search move must remove
            per expert sent.
    """
    if (
        current.phy2log.shape != fresh.phy2log.shape
        or current.num_workers != fresh.num_workers
        or current.num_experts != fresh.num_experts
    ):
        raise ValueError(
            f"current placement has {current.phy2log.shape} (layers, slots) of "
            f"{current.num_experts} experts over {current.num_workers} workers; the load and "
            f"sizes asked for give {fresh.phy2log.shape} of {fresh.num_experts} over "
            f"{fresh.num_workers}"
        )
    if target_imbalance < 1.0:
        raise ValueError(f"target_imbalance must be >= 1.0, got {target_imbalance}")
    num_workers, num_experts = current.num_workers, current.num_experts
    rows = []
    reachable = fresh.imbalance(load_LE)
    for layer, load_E in enumerate(load_LE):
        now = current.phy2log[layer]
        # A target plain EPLB cannot reach either becomes the balance plain EPLB does reach.
        target = max(target_imbalance, float(reachable[layer]))
        aligned = align_workers(now, fresh.phy2log[layer], num_workers, num_nodes)
        allowed = _allowed_workers(now, num_experts, num_workers, num_groups, num_nodes)
        options = [aligned]
        if allowed is not None:
            options.append(local_search(load_E, now, num_workers, allowed, target, min_gain_per_move))
        rows.append(min(options, key=lambda row: _rank(load_E, now, row, num_workers, target)))
    return Placement.from_phy2log(rows, num_experts, num_workers)


def _rank(load_E, now, row, num_workers, target) -> tuple:
    """Meets the target first, then fewest experts sent, then lowest imbalance."""
    old = Placement.from_phy2log(now, len(load_E), num_workers)
    new = Placement.from_phy2log(row, len(load_E), num_workers)
    imbalance = float(new.imbalance(load_E[None])[0])
    return (imbalance > target + 1e-9, int(moved_experts(old, new)[0]), imbalance)


def _allowed_workers(row, num_experts, num_workers, num_groups, num_nodes) -> np.ndarray | None:
    """(E, W) where each expert may be copied to: the node holding its group (hierarchical), any
    worker (global); None when the current placement spreads a group over several nodes."""
    if num_nodes == 1:
        return np.ones((num_experts, num_workers), dtype=bool)
    group_size = num_experts // num_groups
    slot_node = np.arange(len(row)) // (len(row) // num_nodes)
    node_of_group = np.full(num_groups, -1)
    for expert, node in zip(row, slot_node):
        g = expert // group_size
        if node_of_group[g] not in (-1, node):
            return None
        node_of_group[g] = node
    worker_node = np.arange(num_workers) // (num_workers // num_nodes)
    expert_node = node_of_group[np.arange(num_experts) // group_size]
    return expert_node[:, None] == worker_node[None, :]


def local_search(
    load_E: np.ndarray,
    row: np.ndarray,
    num_workers: int,
    allowed_EW: np.ndarray,
    target: float,
    min_gain_per_move: float,
    max_moves: int = 10_000,
) -> np.ndarray:
    """Greedy rewrites and swaps from `row` (see the module docstring); returns the new (P,) row."""
    slots = np.array(row, dtype=np.int64)
    num_slots, num_experts = len(slots), len(load_E)
    worker_of = np.arange(num_slots) // (num_slots // num_workers)
    threshold = target * load_E.sum() / num_workers
    min_gain = max(min_gain_per_move * load_E.sum() / num_workers, 1e-9 * max(load_E.sum(), 1.0))
    moves = 0
    while moves < max_moves:
        copies_EW = np.zeros((num_experts, num_workers))
        np.add.at(copies_EW, (slots, worker_of), 1)
        count = copies_EW.sum(axis=1)
        per_copy = load_E / count
        load_W = copies_EW.T @ per_copy
        if load_W.max() <= threshold * (1 + 1e-12):
            break
        excess = np.maximum(load_W - threshold, 0).sum()
        best_gain, best_op = min_gain, None
        gain, op = _best_rewrite(
            load_E, slots, worker_of, copies_EW, count, per_copy, load_W, allowed_EW, threshold, excess
        )
        if op is not None and gain > best_gain:
            best_gain, best_op = gain, ("rewrite", *op)
        gain, op = _best_swap(slots, worker_of, copies_EW, per_copy, load_W, allowed_EW, threshold)
        if op is not None and gain / 2 > best_gain:
            best_gain, best_op = gain / 2, ("swap", *op)
        if best_op is None:
            break
        if best_op[0] == "rewrite":
            slots[best_op[1]] = best_op[2]
            moves += 1
        else:
            s1, s2 = best_op[1], best_op[2]
            slots[s1], slots[s2] = slots[s2], slots[s1]
            moves += 2
    return slots


def _best_rewrite(load_E, slots, worker_of, copies_EW, count, per_copy, load_W, allowed_EW, threshold, excess):
    """Best (excess removed, (slot, new expert)) over rewrites of a slot whose expert has >= 2 copies."""
    cand = np.flatnonzero(count[slots] >= 2)
    if not len(cand):
        return 0.0, None
    a, w = slots[cand], worker_of[cand]
    rows = np.arange(len(cand))
    # Removing a copy of `a` from worker w: a's other copies each carry load / (count - 1).
    shrunk = load_E[a] / (count[a] - 1)
    removed_CW = copies_EW[a] * (shrunk - per_copy[a])[:, None]
    removed_CW[rows, w] -= shrunk
    # Adding a copy of `b` on worker w: b's copies each carry load / (count + 1).
    grown = load_E / (count + 1)
    added_EW = copies_EW * (grown - per_copy)[:, None]
    new_CEW = load_W[None, None, :] + removed_CW[:, None, :] + added_EW[None, :, :]
    new_CEW[rows[:, None], np.arange(len(load_E))[None, :], w[:, None]] += grown[None, :]
    gain_CE = excess - np.maximum(new_CEW - threshold, 0).sum(axis=2)
    valid = (copies_EW[:, w].T == 0) & allowed_EW[:, w].T  # b not on w yet, and may go there
    gain_CE = np.where(valid, gain_CE, -np.inf)
    c, b = np.unravel_index(np.argmax(gain_CE), gain_CE.shape)
    return float(gain_CE[c, b]), (int(cand[c]), int(b))


def _best_swap(slots, worker_of, copies_EW, per_copy, load_W, allowed_EW, threshold):
    """Best (excess removed, (slot1, slot2)) over swaps of two slots on different workers."""
    a, w = slots, worker_of
    moved = per_copy[a][:, None] - per_copy[a][None, :]  # load leaving w[s1] (and joining w[s2])
    before = np.maximum(load_W[w] - threshold, 0)
    after1 = np.maximum(load_W[w][:, None] - moved - threshold, 0)
    after2 = np.maximum(load_W[w][None, :] + moved - threshold, 0)
    gain = before[:, None] + before[None, :] - after1 - after2
    valid = (
        (w[:, None] != w[None, :])
        & (a[:, None] != a[None, :])
        & (copies_EW[a[:, None], w[None, :]] == 0)
        & (copies_EW[a[None, :], w[:, None]] == 0)
        & allowed_EW[a[:, None], w[None, :]]
        & allowed_EW[a[None, :], w[:, None]]
    )
    gain = np.where(valid, gain, -np.inf)
    s1, s2 = np.unravel_index(np.argmax(gain), gain.shape)
    if not np.isfinite(gain[s1, s2]):
        return 0.0, None
    return float(gain[s1, s2]), (int(s1), int(s2))


def align_workers(current_row: np.ndarray, fresh_row: np.ndarray, num_workers: int, num_nodes: int = 1) -> np.ndarray:
    """`fresh_row` with whole workers renamed (and whole nodes, keeping each node's workers
    together) so that as many experts as possible stay where they are; within a worker, an
    expert already in a slot keeps that slot."""
    per_worker = len(current_row) // num_workers
    old = np.asarray(current_row).reshape(num_workers, per_worker)
    new = np.asarray(fresh_row).reshape(num_workers, per_worker)
    overlap = np.array([[_common(old[i], new[j]) for j in range(num_workers)] for i in range(num_workers)])
    per_node = num_workers // num_nodes
    node_value = np.zeros((num_nodes, num_nodes))
    node_match = {}
    for n in range(num_nodes):
        for m in range(num_nodes):
            block = overlap[n * per_node : (n + 1) * per_node, m * per_node : (m + 1) * per_node]
            rows, cols = linear_sum_assignment(block, maximize=True)
            node_value[n, m] = block[rows, cols].sum()
            node_match[n, m] = cols
    out = np.empty_like(old)
    for n, m in zip(*linear_sum_assignment(node_value, maximize=True)):
        for i, j in enumerate(node_match[n, m]):
            out[n * per_node + i] = _keep_slots(old[n * per_node + i], new[m * per_node + j])
    return out.reshape(-1)


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Size of the multiset intersection of two slot lists."""
    va, ca = np.unique(a, return_counts=True)
    vb, cb = np.unique(b, return_counts=True)
    _, ia, ib = np.intersect1d(va, vb, return_indices=True)
    return int(np.minimum(ca[ia], cb[ib]).sum())


def _keep_slots(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The experts of `new`, ordered so each one also in `old` keeps its slot index there."""
    remaining = list(new)
    out = [None] * len(old)
    for i, expert in enumerate(old):
        if expert in remaining:
            out[i] = expert
            remaining.remove(expert)
    fill = iter(remaining)
    return np.array([e if e is not None else next(fill) for e in out], dtype=np.int64)
