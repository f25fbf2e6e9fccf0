"""EPLB replicas: placement with redundant slots, and the all-to-all dispatcher spreading a
replicated expert's pairs over its copies (2 gloo processes, no Ray).

Reference: every expert in one process through the model's `LocalDispatcher`; the output of a
pair does not depend on which copy computed it, so outputs must match exactly, while the rows
each copy received show the spreading rule (pair index mod number of copies) at work.
"""

import pytest
import torch
import torch.distributed as dist

from raymoe.config import ConfigError
from raymoe.parallel.launch import spawn_gloo
from raymoe.parallel.layout import ExpertPlacement

D, E, K = 6, 4, 2


def test_with_redundant_puts_the_copy_on_another_rank():
    # Prepare / Execute: 4 experts + copies of 1 and 2 over 2 ranks = 3 slots each.
    placement = ExpertPlacement.with_redundant(4, 2, [1, 2])
    # Assert (by hand): primaries 0,1 | 2,3; copy of 1 goes to rank 1 (rank 0 already holds 1);
    # copy of 2 then goes to rank 0, the only rank with a free slot (and not holding 2).
    assert placement.slot_expert == [0, 1, 2, 2, 3, 1]
    assert placement.expert_slots[1] == [1, 5] and placement.expert_slots[2] == [2, 3]


def test_copy_that_only_fits_beside_its_original_is_swapped_apart():
    # 7 experts + copy of 4 over 2 ranks: primaries 0-3 | 4-6 leave the free slot on rank 1,
    # which holds 4; the copy trades places with rank 0's first expert (0), so 4 is on both.
    placement = ExpertPlacement.with_redundant(7, 2, [4])
    assert placement.slot_expert == [4, 1, 2, 3, 4, 5, 6, 0]
    assert [placement.slot_rank(s) for s in placement.expert_slots[4]] == [0, 1]


def test_with_redundant_without_copies_is_contiguous():
    assert ExpertPlacement.with_redundant(8, 2, []) == ExpertPlacement.contiguous(8, 2)


def test_uneven_slots_fail_naming_both_numbers():
    with pytest.raises(ConfigError, match=r"8 \+ 1 = 9 expert slots do not split evenly over ep=2"):
        ExpertPlacement.with_redundant(8, 2, [3])
    with pytest.raises(ConfigError, match="outside"):
        ExpertPlacement.with_redundant(7, 2, [7])


def _weights():
    return torch.randn(E, D, D, generator=torch.Generator().manual_seed(3))


def _inputs(rank):
    """Rank 0: 4 tokens, every pair to expert 1 except one to expert 0 and one dropped;
    rank 1: no tokens at all (it must still join both exchanges)."""
    if rank == 1:
        return torch.zeros(0, D), torch.zeros(0, K, dtype=torch.long)
    x_TD = torch.randn(4, D, generator=torch.Generator().manual_seed(11))
    ids_TK = torch.tensor([[1, 0], [1, 1], [1, -1], [1, 1]])
    return x_TD, ids_TK


def _local_reference(x_TD, ids_TK):
    from raymoe.models.moe import LocalDispatcher

    dispatcher, W = LocalDispatcher(E), _weights()
    x_SD, counts, state = dispatcher.dispatch(x_TD, ids_TK)
    pieces = [rows @ W[e] for e, rows in enumerate(torch.split(x_SD, counts))]
    return dispatcher.combine(torch.cat(pieces), state)


def _worker(rank):
    from raymoe.parallel.all_to_all import AllToAllDispatcher

    # Expert 1 (the hot one) has a copy on each rank; 2 gets one too so the 6 slots split 3 + 3.
    placement = ExpertPlacement(num_experts=E, ep=2, slot_expert=[0, 1, 2, 2, 3, 1])
    dispatcher = AllToAllDispatcher(dist.group.WORLD, placement=placement, ep_rank=rank)
    W_local = _weights()[placement.experts_of(rank)]
    x_TD, ids_TK = _inputs(rank)
    x_SD, counts, state = dispatcher.dispatch(x_TD, ids_TK)
    pieces = [rows @ W_local[e] for e, rows in enumerate(torch.split(x_SD, counts)) if rows.shape[0]]
    y_SD = torch.cat(pieces) if pieces else x_SD.new_zeros(0, D)
    return {"y": dispatcher.combine(y_SD, state), "counts": counts}


def test_replicated_expert_spreads_over_copies_and_matches_local():
    # Execute
    results = spawn_gloo(_worker, 2)
    # Assert: outputs equal the one-process reference; the empty rank gets an empty result.
    x_TD, ids_TK = _inputs(0)
    torch.testing.assert_close(results[0]["y"], _local_reference(x_TD, ids_TK))
    assert results[1]["y"].shape == (0, K, D)
    # Pairs (index t*K+k) to expert 1: 0, 2, 3, 4, 6, 7. Copy = index mod 2: even 0, 2, 4, 6 ->
    # slot 1 (rank 0, local 1); odd 3, 7 -> slot 5 (rank 1, local 2). Pair 1 -> expert 0.
    assert results[0]["counts"] == [1, 4, 0]
    assert results[1]["counts"] == [0, 0, 2]
