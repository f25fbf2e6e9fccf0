"""Expert re-placement (EPLB): hand-worked packings, the Zipf 64/8/8 balance, groups on nodes,
migration-aware moves, table invariants and the conversion to `raymoe.parallel` placements."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe.deploy.eplb import pack_balanced, rebalance_experts, replicate
from raymoe.deploy.placement import Placement, moved_experts
from raymoe.parallel.layout import ExpertPlacement


def zipf_load(num_experts: int, s: float, seed: int) -> np.ndarray:
    """Expected tokens per expert under Zipf's law (1e6 in all), ranks shuffled over experts."""
    weights = 1.0 / np.arange(1, num_experts + 1) ** s
    return (weights / weights.sum() * 1e6)[np.random.default_rng(seed).permutation(num_experts)]


def check_invariants(p: Placement, num_nodes: int = 1) -> None:
    """Every expert has a slot; phy2log, log2phy and logcnt agree; equal slots per worker; no
    worker holds two copies of one expert while a copy could sit elsewhere on its node."""
    assert (p.logcnt >= 1).all()
    assert (p.logcnt.sum(axis=1) == p.num_slots).all()
    assert p.num_slots % p.num_workers == 0
    workers_per_node = p.num_workers // num_nodes
    for layer in range(p.num_layers):
        for expert in range(p.num_experts):
            slots = p.log2phy[layer, expert]
            real = slots[slots >= 0]
            assert len(real) == p.logcnt[layer, expert]
            assert (p.phy2log[layer, real] == expert).all()
            assert list(real) == sorted(real)
        for w in range(p.num_workers):
            held = p.worker_experts(layer, w)
            assert len(held) == p.slots_per_worker
            assert len(set(held)) == len(held) or p.logcnt[layer].max() > workers_per_node


def test_pack_balanced_greedy_then_swap_by_hand():
    # Prepare: 6 items into 2 packs of 3. By hand, greedy (heaviest first, lightest pack with room,
    # ties to the lower pack): 4->p0, 2->p1, 2->p1, 2->p0, 1->p1, 1->p0 -> loads 7 / 5.
    # The swap pass trades p0's 2 for p1's 1 (pair max 6 < 7) -> 6 / 6, the optimum.
    weights = np.array([4.0, 2.0, 2.0, 2.0, 1.0, 1.0])
    # Execute
    pack = pack_balanced(weights, 2)
    # Assert
    assert np.bincount(pack, weights=weights).tolist() == [6.0, 6.0]
    assert np.bincount(pack).tolist() == [3, 3]


def test_replicate_gives_extra_slots_to_most_load_per_copy():
    # By hand: per-copy loads [8, 3, 1] -> e0 (4) -> e0 (2.67) -> e1 gets the last slot (3 > 2.67).
    assert replicate(np.array([8.0, 3.0, 1.0]), 6).tolist() == [3, 2, 1]
    # With at most 2 copies (2 workers) the third extra slot goes to e1, then e2.
    assert replicate(np.array([8.0, 3.0, 1.0]), 6, max_copies=2).tolist() == [2, 2, 2]


def test_four_experts_two_workers_no_redundancy_by_hand():
    # Prepare: loads [10, 1, 6, 5]; greedy: e0->w0 (10), e2->w1 (6), e3->w1 (11), e1->w0 (11).
    # Within a worker the hotter expert comes first.
    load = torch.tensor([[10, 1, 6, 5]])
    # Execute
    p = rebalance_experts(load, num_slots=4, num_workers=2)
    # Assert
    assert p.phy2log.tolist() == [[0, 1, 2, 3]]
    assert p.worker_load(load).tolist() == [[11.0, 11.0]]
    assert p.logcnt.tolist() == [[1, 1, 1, 1]]


def test_four_experts_two_workers_two_redundant_by_hand():
    # Prepare: loads [12, 2, 4, 2], 6 slots. Copies (at most 2 = workers): e0 -> 2 (6 each), then
    # e0 is capped and e2 gets 2 (2 each). Items 6, 6, 2 (e1), 2, 2 (e2), 2 (e3): e0->w0, e0->w1,
    # e1->w0, e2->w1, e2->w0 (w1 holds e2), e3->w1 -> 10 / 10.
    load = np.array([[12, 2, 4, 2]])
    # Execute
    p = rebalance_experts(load, num_slots=6, num_workers=2)
    # Assert
    assert p.phy2log.tolist() == [[0, 2, 1, 0, 2, 3]]
    assert p.logcnt.tolist() == [[2, 1, 2, 1]]
    assert p.log2phy.tolist() == [[[0, 3], [2, -1], [1, 4], [5, -1]]]
    assert p.worker_load(load).tolist() == [[10.0, 10.0]]
    check_invariants(p)


def test_zipf_64_experts_8_workers_8_redundant_within_1_1(capsys):
    # Prepare: Zipf(s=1) load over 64 experts: the hottest expert alone is 21% of all tokens.
    load = np.stack([zipf_load(64, 1.0, seed) for seed in range(4)])
    before = Placement.from_phy2log(np.tile(np.arange(64), (4, 1)), 64, 8)  # 8 per worker, no copies
    # Execute
    global_p = rebalance_experts(load, num_slots=72, num_workers=8, policy="global")
    hier_p = rebalance_experts(load, num_slots=72, num_workers=8, num_groups=8, num_nodes=2, policy="hierarchical")
    # Assert
    with capsys.disabled():
        print(
            f"\nZipf 64/8/8 max/mean before {before.imbalance(load).round(3)} "
            f"after global {global_p.imbalance(load).round(3)} hierarchical {hier_p.imbalance(load).round(3)}"
        )
    assert (before.imbalance(load) > 1.5).all()
    assert (global_p.imbalance(load) <= 1.1).all()
    # Hierarchical keeps each group on one node, so no split can beat the best group-to-node
    # partition (found by trying all 70 ways to put 4 of the 8 groups on node 0): seed 3 has one
    # group with 40% of the load, and its best split is 1.117.
    for layer, row in enumerate(load):
        groups = row.reshape(8, 8).sum(axis=1)
        best = min(
            max(groups[list(c)].sum(), groups.sum() - groups[list(c)].sum())
            for c in itertools.combinations(range(8), 4)
        ) / (groups.sum() / 2)
        assert hier_p.imbalance(load)[layer] <= max(1.1, best * 1.01)
    check_invariants(global_p)
    check_invariants(hier_p, num_nodes=2)


def test_hierarchical_keeps_each_group_on_one_node():
    # Prepare: 64 experts in 8 groups of 8 (DeepSeek-style group-limited routing), 2 nodes x 4 workers.
    load = np.stack([zipf_load(64, 1.2, seed) for seed in range(3)])
    # Execute
    p = rebalance_experts(load, num_slots=72, num_workers=8, num_groups=8, num_nodes=2, policy="auto")
    # Assert: the slots of node n (workers 4n..4n+3) hold experts of 4 whole groups, none shared.
    for layer in range(3):
        node_groups = [set(p.phy2log[layer, n * 36 : (n + 1) * 36] // 8) for n in range(2)]
        assert len(node_groups[0]) == len(node_groups[1]) == 4
        assert not node_groups[0] & node_groups[1]


@pytest.mark.parametrize("groups, nodes", [(1, 1), (8, 2)])
def test_migration_aware_moves_fewer_than_plain_for_the_same_target(groups, nodes, capsys):
    # Prepare: yesterday's window placed by plain EPLB; today 12 experts per layer trade popularity
    # and the counts are fresh samples, so the running placement drifts past the 1.1 target.
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 65)
    weights /= weights.sum()
    ranks = np.stack([rng.permutation(64) for _ in range(4)])
    old = np.stack([rng.multinomial(200_000, weights[r]) for r in ranks])
    for r in ranks:
        swap = rng.choice(64, size=12, replace=False)
        r[swap] = r[rng.permutation(swap)]
    new = np.stack([rng.multinomial(200_000, weights[r]) for r in ranks])
    sizes = dict(num_slots=72, num_workers=8, num_groups=groups, num_nodes=nodes)
    current = rebalance_experts(old, **sizes)
    # Execute
    plain = rebalance_experts(new, **sizes)
    aware = rebalance_experts(new, **sizes, current=current, target_imbalance=1.1)
    # Assert
    plain_moves, aware_moves = int(moved_experts(current, plain).sum()), int(moved_experts(current, aware).sum())
    with capsys.disabled():
        print(
            f"\n{groups} groups on {nodes} nodes: running placement on new load "
            f"{current.imbalance(new).round(3)}; plain EPLB "
            f"{plain.imbalance(new).round(3)} moving {plain_moves}; migration-aware "
            f"{aware.imbalance(new).round(3)} moving {aware_moves}"
        )
    assert current.imbalance(new).max() > 1.1
    assert (plain.imbalance(new) <= 1.1).all() and (aware.imbalance(new) <= 1.1).all()
    assert aware_moves < plain_moves
    check_invariants(aware, num_nodes=nodes)
    for layer in range(4):  # each group's experts stay on one node
        node_groups = [set(aware.phy2log[layer, n * 72 // nodes : (n + 1) * 72 // nodes] // 8) for n in range(nodes)]
        assert sum(len(g) for g in node_groups) == 8


def test_migration_aware_one_rewrite_by_hand():
    # Prepare: w0 [e0, e1, e2], w1 [e0, e3, e2]; e1 turns hot: loads [2, 12, 4, 2] give
    # w0 = 1 + 12 + 2 = 15, w1 = 1 + 2 + 2 = 5 (mean 10). Rewriting one of w1's redundant slots
    # (e0 or e2) into a copy of e1 gives 10 / 10 or 11 / 9: one expert sent, within 1.1.
    current = Placement.from_phy2log([[0, 1, 2, 0, 3, 2]], 4, 2)
    load = np.array([[2, 12, 4, 2]])
    # Execute
    aware = rebalance_experts(load, num_slots=6, num_workers=2, current=current, target_imbalance=1.1)
    # Assert
    assert current.worker_load(load).tolist() == [[15.0, 5.0]]
    assert moved_experts(current, aware).tolist() == [1]
    assert aware.worker_experts(0, 0) == [0, 1, 2]
    assert sorted(aware.worker_load(load)[0].tolist()) in ([10.0, 10.0], [9.0, 11.0])


def test_migration_aware_keeps_a_balanced_layer_untouched():
    load = np.array([[12, 2, 4, 2]])
    current = rebalance_experts(load, num_slots=6, num_workers=2)
    aware = rebalance_experts(load, num_slots=6, num_workers=2, current=current)
    assert aware.phy2log.tolist() == current.phy2log.tolist()


def test_moved_experts_counts_arrivals_not_reordering():
    old = Placement.from_phy2log([[0, 1, 2, 3]], 4, 2)
    # Same workers, slots reordered: nothing crosses the network.
    assert moved_experts(old, Placement.from_phy2log([[1, 0, 3, 2]], 4, 2)).tolist() == [0]
    # e1 and e2 trade workers: two copies sent.
    assert moved_experts(old, Placement.from_phy2log([[0, 2, 1, 3]], 4, 2)).tolist() == [2]


def test_round_trip_with_parallel_expert_placement():
    # Prepare: the serving layout's own placement, 8 experts, ep=2, copies of e0 and e5.
    layer = ExpertPlacement.with_redundant(8, 2, [0, 5])
    # Execute
    tables = Placement.from_expert_placements([layer, layer])
    back = tables.to_expert_placement(1)
    # Assert
    assert back.slot_expert == layer.slot_expert and back.ep == 2 and back.num_experts == 8
    for expert, slots in layer.expert_slots.items():
        assert [s for s in tables.log2phy[1, expert] if s >= 0] == slots


def test_every_layer_converts_to_a_valid_expert_placement():
    p = rebalance_experts(np.stack([zipf_load(16, 1.0, s) for s in range(3)]), num_slots=20, num_workers=4)
    for layer in range(3):
        placement = p.to_expert_placement(layer)
        assert placement.experts_of(2) == p.worker_experts(layer, 2)


@settings(max_examples=40, deadline=None)
@given(
    num_workers=st.sampled_from([1, 2, 4, 8]),
    per_worker=st.integers(1, 4),
    extra=st.integers(0, 2),
    seed=st.integers(0, 10_000),
)
def test_invariants_hold_for_random_loads(num_workers, per_worker, extra, seed):
    num_slots = num_workers * (per_worker + extra)
    num_experts = num_workers * per_worker
    load = np.random.default_rng(seed).integers(0, 1000, size=(2, num_experts))
    p = rebalance_experts(load, num_slots=num_slots, num_workers=num_workers)
    check_invariants(p)
    # Copies split an expert's tokens; none are lost or made up.
    assert np.allclose(p.worker_load(load).sum(axis=1), load.sum(axis=1))


def test_sizes_that_do_not_fit_fail_with_the_numbers():
    with pytest.raises(ValueError, match="num_workers=3 must divide num_slots=8"):
        rebalance_experts(np.ones((1, 8)), num_slots=8, num_workers=3)
    with pytest.raises(ValueError, match="num_nodes=3 must divide num_groups=8"):
        rebalance_experts(
            np.ones((1, 64)), num_slots=72, num_workers=6, num_groups=8, num_nodes=3, policy="hierarchical"
        )
    with pytest.raises(ValueError, match=r"load has shape \(1, 4\)"):
        Placement.from_phy2log([[0, 1, 2, 3, 4, 5]], 6, 2).worker_load(np.ones((1, 4)))
    with pytest.raises(ValueError, match="logical expert 3 has no slot"):
        Placement.from_phy2log([[0, 1, 2, 0]], 4, 2)
