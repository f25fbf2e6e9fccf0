"""The LM head and cross-entropy as one step, gradients computed in the forward.

`F.cross_entropy(lm_head(h).float(), targets)` materialises a float32 (N, V) logits tensor, its
log-softmax and, in backward, a zero-filled gradient of the same size and a log-softmax
backward: at the bench shape (N = 4096 tokens, V = 32000) each is 524 MB. On CPU a tensor that
size comes from a fresh `mmap` every time (glibc never keeps blocks above 32 MiB for reuse), so
its first touch pays a page fault per 4 KiB: profiled on a 2-core Xeon, the zero-fill alone took
0.8 s and the loss 2.9 s of a 6.5 s bf16 train step.

Here, as in Liger-Kernel's fused linear cross-entropy, the logits go into one workspace of the
compute dtype that is kept between steps, are turned into d loss / d logits in place a few rows
at a time (rows that fit the cache: log-sum-exp, softmax, minus one at the target), and the two
gradient GEMMs run in forward; backward only scales them by the incoming gradient. The math is
that of the unfused path: logits in the compute dtype (bf16 under autocast, as the LM head's
matmul gives there), softmax in float32, the gradient cast back to the compute dtype for the
GEMMs, as autocast's backward does.

Shapes: N rows (tokens), D model dim, V vocabulary, C rows of a chunk.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Float32 logits per chunk of the in-place softmax: on CPU about 4 MiB, so the chunk's passes
# (log-sum-exp, exp, cast back) stay in the cache; on an accelerator larger chunks, so that a few
# kernel launches cover the logits.
_CPU_CHUNK_BYTES = 4 << 20
_ACCELERATOR_CHUNK_BYTES = 256 << 20

_workspace: torch.Tensor | None = None


def _logits_workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, kept for the next step: a fresh one of this
    size would be page-faulted in again on every step."""
    global _workspace
    ws = _workspace
    if ws is None or ws.dtype != dtype or ws.device != device or ws.numel() < numel:
        _workspace = None  # let the old one go before the new one is allocated
        ws = _workspace = torch.empty(numel, dtype=dtype, device=device)
    return ws[:numel]


def release_workspace() -> None:
    """Frees the kept logits workspace (after training, in a process that goes on)."""
    global _workspace
    _workspace = None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, compute_dtype, reduction):
        N, V = h_ND.shape[0], weight_VD.shape[0]
        valid_N = targets_N != IGNORE_INDEX
        num_valid = valid_N.sum()
        with torch.autocast(h_ND.device.type, enabled=False):
            h_c = h_ND.to(compute_dtype)
            w_c = weight_VD.to(compute_dtype)
            # The logits, then d loss / d logits in their place.
            grad_NV = _logits_workspace(N * V, compute_dtype, h_ND.device).view(N, V)
            torch.mm(h_c, w_c.t(), out=grad_NV)
            loss_N = torch.zeros(N, dtype=torch.float32, device=h_ND.device)
            # Mean: every valid row's gradient carries 1 / num_valid (0/0 -> nan, as F.cross_entropy).
            scale_N = valid_N.float() / num_valid.float() if reduction == "mean" else valid_N.float()
            chunk_bytes = _CPU_CHUNK_BYTES if h_ND.device.type == "cpu" else _ACCELERATOR_CHUNK_BYTES
            rows = max(1, chunk_bytes // (4 * V))
            for start in range(0, N, rows):
                end = min(N, start + rows)
                _softmax_grad_rows(grad_NV[start:end], targets_N[start:end], scale_N[start:end], loss_N[start:end])
            loss = (loss_N * valid_N).sum()
            if reduction == "mean":
                loss = loss / num_valid.float()
            grad_h = torch.mm(grad_NV, w_c).to(h_ND.dtype) if ctx.needs_input_grad[0] else None
            grad_w = torch.mm(grad_NV.t(), h_c).to(weight_VD.dtype) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has_grads = (grad_h is not None, grad_w is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if has else None for has in ctx.has_grads]
        if not bool(grad_loss == 1):
            grads = [g * grad_loss.to(g.dtype) if g is not None else None for g in grads]
        return grads[0], grads[1], None, None, None


def _softmax_grad_rows(
    logits_CV: torch.Tensor, targets_C: torch.Tensor, scale_C: torch.Tensor, loss_C: torch.Tensor
) -> None:
    """In place: logits -> (softmax - onehot(target)) * scale, and each row's loss into loss_C."""
    x_CV = logits_CV.float()  # a copy for bf16 logits, the rows themselves for float32
    lse_C = torch.logsumexp(x_CV, dim=1)
    index_C1 = targets_C.clamp(min=0)[:, None]
    loss_C.copy_(lse_C - x_CV.gather(1, index_C1)[:, 0])
    x_CV.sub_(lse_C[:, None]).exp_()
    x_CV.scatter_add_(1, index_C1, -torch.ones_like(x_CV[:, :1]))
    x_CV.mul_(scale_C[:, None])
    if x_CV.data_ptr() != logits_CV.data_ptr():
        logits_CV.copy_(x_CV)


def linear_cross_entropy(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(h, weight).float(), targets, reduction=reduction)` without the
    (N, V) float32 tensors (see the module doc); targets of -100 carry no loss.

    The compute dtype is autocast's where autocast is on (bf16 on CPU), else the weight's.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    device = h_ND.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight_VD.dtype
    return _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N, compute_dtype, reduction)
