"""Expert re-placement policy (EPLB): tokens per expert per layer in, slot tables out.

DeepSeek-V3 serves hot experts from redundant copies and packs the copies so that every GPU
receives about the same number of tokens (DeepSeek-V3 technical report, arXiv 2412.19437, section
3.4; the policy is published as github.com/deepseek-ai/EPLB, eplb.py). This file keeps its shape:
a per-layer load in, `phy2log` / `log2phy` / replica-count tables out (`deploy.placement.Placement`),
and two policies that are two uses of one routine, `_place_layer`:

- hierarchical: pack expert groups onto nodes (balanced by group load), replicate the hottest
  experts within each node, pack the copies onto that node's workers. Group-limited routing then
  keeps a token's experts on few nodes, so less of the all-to-all crosses the slow links.
- global: the same routine with one group and one node (DeepSeek's choice for large decode EP).

Where this departs from the reference:
- a worker never gets two copies of one expert when the packing can avoid it (a second copy beside
  the first takes no load off that worker), so copies per expert are capped at the workers there;
- after the greedy packing, a swap pass trades items between the heaviest worker and another
  while that lowers the heavier of the two;
- `current=` switches to migration-aware mode (`deploy.eplb_migration`): start from the running
  placement and move as few experts as needed to reach a target balance.

Legend: L MoE layers, E logical experts, P physical slots (E + redundant), W workers, N nodes,
G expert groups, S slots per worker.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from raymoe.deploy.eplb_migration import rebalance_from
from raymoe.deploy.placement import Placement, check_load

Policy = Literal["auto", "hierarchical", "global"]


def pack_balanced(
    weights: np.ndarray,
    num_packs: int,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Puts n weighted items into `num_packs` packs of n / num_packs items each, balancing weight.

    Greedy (heaviest item first, into the lightest pack with room that holds no item of the same
    label), then swaps between the heaviest pack and another while that lowers the heaviest.

    Args:
        weights: (n,) item weights.
        num_packs: number of packs; must divide n.
        labels: (n,) optional labels; two items of one label avoid sharing a pack when possible.

    Returns:
        (n,) pack index of each item.
    """
    n = len(weights)
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    size = n // num_packs
    labels = np.arange(n) if labels is None else np.asarray(labels)
    pack = np.full(n, -1, dtype=np.int64)
    load = np.zeros(num_packs)
    count = np.zeros(num_packs, dtype=np.int64)
    held: list[set[int]] = [set() for _ in range(num_packs)]
    for item in np.argsort(-weights, kind="stable"):
        room = [p for p in range(num_packs) if count[p] < size]
        apart = [p for p in room if labels[item] not in held[p]] or room
        target = min(apart, key=lambda p: (load[p], p))
        pack[item] = target
        load[target] += weights[item]
        count[target] += 1
        held[target].add(int(labels[item]))
    _swap_down(weights, labels, pack, num_packs)
    return pack


def _swap_down(
    weights: np.ndarray, labels: np.ndarray, pack: np.ndarray, num_packs: int, max_rounds: int = 1000
) -> None:
    """Swaps an item of the heaviest pack with a lighter item elsewhere while the swap lowers the
    heavier of the two packs below the heaviest's load; in place."""
    for _ in range(max_rounds):
        load = np.bincount(pack, weights=weights, minlength=num_packs)
        h = int(np.argmax(load))
        mine = np.flatnonzero(pack == h)
        other = np.flatnonzero(pack != h)
        delta = weights[mine][:, None] - weights[other][None, :]  # load leaving h per swap
        pair_max = np.maximum(load[h] - delta, load[pack[other]][None, :] + delta)
        ok = (delta > 0) & (pair_max < load[h] - 1e-9 * max(load[h], 1.0))
        other_items = other.tolist()
        for i, a in enumerate(mine.tolist()):  # label rules: no second copy of a label in either pack
            for j, b in enumerate(other_items):
                if ok[i, j] and (_holds(labels, pack, pack[b], labels[a], b) or _holds(labels, pack, h, labels[b], a)):
                    ok[i, j] = False
        if not ok.any():
            return
        best_i, best_j = np.unravel_index(np.argmin(np.where(ok, pair_max, np.inf)), ok.shape)
        a, b = mine[best_i], other[best_j]
        pack[a], pack[b] = pack[b], pack[a]


def _holds(labels: np.ndarray, pack: np.ndarray, p: int, label: int, leaving: int) -> bool:
    """Whether pack `p` holds an item of `label` other than the item `leaving` it."""
    same = (pack == p) & (labels == label)
    same[leaving] = False
    return bool(same.any())


def replicate(weights: np.ndarray, num_slots: int, max_copies: int | None = None) -> np.ndarray:
    """Gives each of the `num_slots - E` extra slots to the expert with the most load per copy.

    Args:
        weights: (E,) load per logical expert.
        num_slots: physical slots, >= E.
        max_copies: most copies of one expert (the workers they may be spread over); None = no cap.
            Raised to ceil(num_slots / E) when the cap could not fill the slots.

    Returns:
        (E,) copies per expert, each >= 1, summing to `num_slots`.
    """
    num_experts = len(weights)
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    cap = max(max_copies or num_slots, -(-num_slots // num_experts))
    copies = np.ones(num_experts, dtype=np.int64)
    for _ in range(num_slots - num_experts):
        per_copy = np.where(copies < cap, weights / copies, -np.inf)
        copies[int(np.argmax(per_copy))] += 1
    return copies


def _place_layer(load_E: np.ndarray, num_slots: int, num_workers: int, num_groups: int, num_nodes: int) -> np.ndarray:
    """One layer: groups -> nodes, copies within each node, copies -> the node's workers.

    Returns:
        (P,) phy2log row; worker w owns slots w*S .. (w+1)*S - 1.
    """
    num_experts = len(load_E)
    group_size = num_experts // num_groups
    workers_per_node = num_workers // num_nodes
    slots_per_node = num_slots // num_nodes
    slots_per_worker = num_slots // num_workers
    group_load = load_E.reshape(num_groups, group_size).sum(axis=1)
    node_of_group = pack_balanced(group_load, num_nodes)
    phy2log = np.empty(num_slots, dtype=np.int64)
    for node in range(num_nodes):
        experts = np.concatenate(
            [np.arange(g * group_size, (g + 1) * group_size) for g in np.flatnonzero(node_of_group == node)]
        )
        copies = replicate(load_E[experts], slots_per_node, max_copies=workers_per_node)
        copy_expert = np.repeat(experts, copies)
        copy_load = np.repeat(load_E[experts] / copies, copies)
        worker = pack_balanced(copy_load, workers_per_node, labels=copy_expert)
        for local in range(workers_per_node):
            w = node * workers_per_node + local
            held = copy_expert[worker == local]
            # Within a worker, hottest first: a stable, readable order (slot order is free).
            held = held[np.argsort(-load_E[held], kind="stable")]
            phy2log[w * slots_per_worker : (w + 1) * slots_per_worker] = held
    return phy2log


def resolve_policy(policy: Policy, num_groups: int, num_nodes: int) -> tuple[int, int]:
    """(groups, nodes) the routine runs with: hierarchical keeps them, global uses (1, 1).

    `auto` is hierarchical when there is more than one node and the nodes divide the groups
    (DeepSeek's rule), else global.
    """
    if policy == "auto":
        policy = "hierarchical" if num_nodes > 1 and num_groups % num_nodes == 0 else "global"
    if policy == "global":
        return 1, 1
    if policy != "hierarchical":
        raise ValueError(f"policy must be auto, hierarchical or global, got {policy!r}")
    if num_groups % num_nodes:
        raise ValueError(f"hierarchical policy: num_nodes={num_nodes} must divide num_groups={num_groups}")
    return num_groups, num_nodes


def check_shapes(num_experts: int, num_slots: int, num_workers: int, num_groups: int, num_nodes: int) -> None:
    """Fails with the fields and numbers when the sizes cannot form a placement."""
    rules = [
        (num_slots >= num_experts, f"num_slots={num_slots} must be >= num_experts={num_experts}"),
        (
            num_workers >= 1 and num_slots % num_workers == 0,
            f"num_workers={num_workers} must divide num_slots={num_slots}",
        ),
        (
            num_nodes >= 1 and num_workers % num_nodes == 0,
            f"num_nodes={num_nodes} must divide num_workers={num_workers}",
        ),
        (
            num_groups >= 1 and num_experts % num_groups == 0,
            f"num_groups={num_groups} must divide num_experts={num_experts}",
        ),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)


def rebalance_experts(
    load_LE,
    num_slots: int,
    num_workers: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    policy: Policy = "auto",
    current: Placement | None = None,
    target_imbalance: float = 1.1,
    min_gain_per_move: float = 0.0,
) -> Placement:
    """Expert placement for every MoE layer from measured load.

    Args:
        load_LE: (L, E) tokens routed to each logical expert of each MoE layer over a window
            (padding rows excluded); a torch tensor or anything numpy reads.
        num_slots: physical expert slots per layer (E + redundant), split evenly over workers.
        num_workers: expert-parallel workers (GPUs or shard actors).
        num_groups: expert groups of group-limited routing (`model.moe.num_groups`).
        num_nodes: nodes the workers sit on; workers n*W/N .. (n+1)*W/N - 1 share node n.
        policy: `hierarchical`, `global`, or `auto` (see `resolve_policy`).
        current: the running placement; when given, migration-aware mode moves as few experts as
            it can (see `deploy.eplb_migration.rebalance_from`).
        target_imbalance: migration-aware mode stops once every layer's max/mean worker load is
            at most this.
        min_gain_per_move: migration-aware mode makes a move only when it removes at least this
            much excess load (in units of the mean worker load) per expert copy sent.

    Returns:
        The new placement's tables.
    """
    groups, nodes = resolve_policy(policy, num_groups, num_nodes)
    load = np.array(load_LE, dtype=np.float64, ndmin=2)
    num_layers, num_experts = load.shape
    check_shapes(num_experts, num_slots, num_workers, groups, nodes)
    load = check_load(load, num_layers, num_experts)
    fresh = Placement.from_phy2log(
        [_place_layer(row, num_slots, num_workers, groups, nodes) for row in load], num_experts, num_workers
    )
    if current is None:
        return fresh
    return rebalance_from(
        load,
        current,
        fresh,
        num_groups=groups,
        num_nodes=nodes,
        target_imbalance=target_imbalance,
        min_gain_per_move=min_gain_per_move,
    )
