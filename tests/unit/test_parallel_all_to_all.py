"""AllToAllDispatcher against a single-process reference, on 2 (and 4) gloo processes, no Ray.

The reference is written out by hand: y[t, k] = x[t] @ W[e] for e = ids[t, k], zero when e = -1.
Each rank computes its own experts on the rows it receives; outputs and gradients (of the tokens
and of the expert weights) must match the reference computed with every expert in one process.
"""

import pytest
import torch
import torch.distributed as dist

from raymoe.parallel.launch import spawn_gloo

D, E = 6, 4


def _inputs(rank: int, T: int, K: int, num_experts: int = E):
    gen = torch.Generator().manual_seed(100 + rank)
    x_TD = torch.randn(T, D, generator=gen)
    ids_TK = torch.randint(0, num_experts, (T, K), generator=gen)
    if T > 1:
        ids_TK[1, 0] = -1  # a dropped pair must come back as zeros
    return x_TD, ids_TK


def _weights():
    return torch.randn(E, D, D, generator=torch.Generator().manual_seed(7))


def _reference(x_TD, ids_TK, W_EDD):
    out = torch.zeros(*ids_TK.shape, D)
    for t in range(ids_TK.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e >= 0:
                out[t, k] = x_TD[t] @ W_EDD[e]
    return out


def _worker(rank, sizes, K, routed, autocast_dtype=None):
    """Runs inside a gloo process (raymoe.parallel.launch): dispatch, compute, combine, backward."""
    from raymoe.parallel.all_to_all import AllToAllDispatcher
    from raymoe.parallel.layout import ExpertPlacement

    world = dist.get_world_size()
    placement = ExpertPlacement.contiguous(E, world)
    dispatcher = AllToAllDispatcher(dist.group.WORLD, placement=placement, ep_rank=rank)
    local = placement.experts_of(rank)
    W_local = _weights()[local].clone().requires_grad_(True)
    x_TD, ids_TK = _inputs(rank, sizes[rank], K, routed)
    x_TD.requires_grad_(True)
    for _ in range(2):  # twice: a collective skipped in the first backward desyncs the second
        x_TD.grad, W_local.grad = None, None
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            x_SD, counts, state = dispatcher.dispatch(x_TD, ids_TK)
            # Grouped compute like GroupedExperts: one matmul per local expert, empty ones skipped.
            pieces, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    pieces.append(x_SD[start : start + n] @ W_local[e])
                start += n
            y_SD = torch.cat(pieces) if pieces else x_SD.new_zeros(0, D)
            y_TKD = dispatcher.combine(y_SD, state).float()
        # A loss weighing every output differently, so a permuted row would change the grads.
        weight = torch.arange(y_TKD.numel(), dtype=torch.float32).reshape(y_TKD.shape) / 100
        (y_TKD * weight).sum().backward()
    return {"y": y_TKD.detach(), "x_grad": x_TD.grad, "w_grad": W_local.grad, "counts": counts, "local": local}


def _run(world, sizes, K, routed, autocast_dtype=None):
    return spawn_gloo(_worker, world, sizes, K, routed, autocast_dtype)


# [5, 0]: a rank with no tokens still takes part in both exchanges (zero-row splits).
# routed=2 on 2 ranks: every pair goes to experts 0-1 (rank 0), so rank 1 computes nothing, yet
# its backward must still join both reverse all-to-alls (the second backward checks that too).
@pytest.mark.parametrize("world,sizes,routed", [(2, [5, 0], E), (4, [4, 1, 6, 2], E), (2, [3, 4], 2)])
def test_dispatch_combine_matches_single_process(world, sizes, routed):
    # Prepare: the reference runs all experts in one process over every rank's tokens.
    K = 2
    W = _weights().requires_grad_(True)
    ref_y, ref_xgrad, total_w_grad = [], [], torch.zeros(E, D, D)
    for rank in range(world):
        x, ids = _inputs(rank, sizes[rank], K, routed)
        x.requires_grad_(True)
        y = _reference(x, ids, W)
        weight = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape) / 100
        if y.requires_grad:  # a rank without tokens contributes nothing
            (y * weight).sum().backward()
        ref_y.append(y.detach())
        ref_xgrad.append(x.grad if x.grad is not None else torch.zeros_like(x))
    total_w_grad = W.grad

    # Execute
    results = _run(world, sizes, K, routed)

    # Assert: outputs and token grads per rank; each expert's grad on its owner sums every rank's
    # tokens routed to it (the backward all-to-all carried them home).
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["y"], ref_y[rank], rtol=1e-5, atol=1e-6)
        x_grad = res["x_grad"] if res["x_grad"] is not None else torch.zeros_like(ref_xgrad[rank])
        torch.testing.assert_close(x_grad, ref_xgrad[rank], rtol=1e-5, atol=1e-6)
        # An expert no pair chose gets no gradient at all (None), which must mean zero.
        w_grad = res["w_grad"] if res["w_grad"] is not None else torch.zeros(len(res["local"]), D, D)
        torch.testing.assert_close(w_grad, total_w_grad[res["local"]], rtol=1e-5, atol=1e-5)
    # Dropped pair: zeros (rank 0 token 1, k 0).
    assert torch.count_nonzero(results[0]["y"][1, 0]) == 0
    # Every valid pair was computed exactly once somewhere.
    valid_pairs = sum(int((_inputs(r, sizes[r], K, routed)[1] >= 0).sum()) for r in range(world))
    assert sum(sum(res["counts"]) for res in results) == valid_pairs


def test_bf16_autocast_with_a_rank_that_computes_nothing_matches_single_process():
    # Prepare: every pair goes to rank 0's experts, so under bf16 autocast rank 0's expert outputs
    # are bf16 matmul results while rank 1 has only fp32 zeros to send back. Before the combine
    # agreed on one wire dtype, gloo read a buffer of half the expected size and aborted.
    sizes, K, routed = [3, 4], 2, 2
    W = _weights()
    ref_y = [_reference(*_inputs(rank, sizes[rank], K, routed), W) for rank in range(2)]

    # Execute
    results = _run(2, sizes, K, routed, torch.bfloat16)

    # Assert: both ranks finished both steps; outputs within bf16 rounding of the fp32 reference.
    assert results[1]["counts"] == [0, 0]
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["y"], ref_y[rank], rtol=2e-2, atol=5e-2)
        assert res["x_grad"] is not None and torch.isfinite(res["x_grad"]).all()
