"""The fused LM-head cross-entropy against `F.cross_entropy(F.linear(h, w).float(), t)`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raymoe.train.fused_lm_loss import linear_cross_entropy, release_workspace


def _pair(N: int, D: int, V: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * 0.2).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = -100  # ignored rows: no loss, no gradient
    return h, w, t


def _loss_and_grads(fn, h, w, t, reduction, bf16, upstream):
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fn(h, w, t, reduction)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


def _reference(h, w, t, reduction):
    return F.cross_entropy(F.linear(h, w).float(), t, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bf16", [False, True])
def test_loss_and_gradients_equal_the_unfused_path(reduction, bf16):
    # V large enough for several softmax chunks (rows per chunk = 4 MiB / (4 V)).
    h, w, t = _pair(N=700, D=48, V=20000)
    ref = _loss_and_grads(_reference, h, w, t, reduction, bf16, upstream=0.5)
    ours = _loss_and_grads(linear_cross_entropy, h, w, t, reduction, bf16, upstream=0.5)
    # fp32: the same math up to summation order; bf16: the same bf16 GEMM inputs, and the
    # weight gradient's bf16 rounding at a different point (one GEMM either way, cast once).
    tol = 1e-5 if not bf16 else 1e-3
    assert torch.allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1:], ref[1:]):
        assert (a - b).norm() / b.norm() < tol
    assert (ours[1][t == -100] == 0).all()  # ignored rows get no gradient


def test_frozen_weight_gets_no_gradient_and_tied_weights_sum_both_uses():
    h, w, t = _pair(N=64, D=16, V=300)
    frozen = w.detach()
    loss = linear_cross_entropy(h, frozen, t)
    loss.backward()
    assert frozen.grad is None and h.grad is not None
    # A weight used by the loss and elsewhere (tied embeddings) accumulates both gradients.
    h.grad = None
    emb = F.embedding(torch.tensor([3, 3, 7]), w).sum()
    (linear_cross_entropy(h, w, t) + emb).backward()
    expected = w.grad.clone()
    w.grad = None
    (_reference(h, w, t, "mean") + F.embedding(torch.tensor([3, 3, 7]), w).sum()).backward()
    assert torch.allclose(expected, w.grad, atol=1e-6)


def test_the_kept_workspace_serves_smaller_and_larger_batches():
    for N in (50, 200, 20):
        h, w, t = _pair(N=N, D=8, V=500, seed=N)
        ours = _loss_and_grads(linear_cross_entropy, h, w, t, "mean", False, upstream=1.0)
        ref = _loss_and_grads(_reference, h, w, t, "mean", False, upstream=1.0)
        assert torch.allclose(ours[0], ref[0], atol=1e-6)
        assert torch.allclose(ours[1], ref[1], atol=1e-6)
    release_workspace()


def test_only_mean_and_sum():
    h, w, t = _pair(N=4, D=4, V=10)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, "none")
