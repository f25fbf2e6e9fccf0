"""INT8 weight quantization for CPU serving: per-output-channel symmetric scales.

Each weight row o is stored as int8 `round(w[o] / s[o])` with `s[o] = max|w[o]| / 127`
(the per-channel scheme of gpt-fast's `WeightOnlyInt8QuantHandler` and LLM.int8's weight side).
The matmul runs in fbgemm/oneDNN's int8 kernels (`torch.ops.quantized.linear_dynamic`), which
quantize each activation batch on the fly (one scale per call) and accumulate in int32: weights
take a quarter of the memory traffic of fp32, which is what bounds CPU decoding at small batch.
The router and embeddings stay fp32 (routing decisions are sensitive; a lookup costs no GEMM).

Shapes: S routed rows, D model dim, F expert hidden, E local experts, O/I out/in features.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from raymoe.inference.packed import ExpertsOnThreads, ModelT, replace_matmul_modules


def quantize_rows(w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8: returns (int8 weights (O, I), fp32 scales (O,))."""
    w = w_OI.detach().float()
    scale_O = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale_O[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale_O


def _pack(w_OI: torch.Tensor, bias_O: torch.Tensor | None):
    q, scale_O = quantize_rows(w_OI)
    zero_O = torch.zeros_like(scale_O, dtype=torch.long)
    qweight = torch._make_per_channel_quantized_tensor(q, scale_O.double(), zero_O, 0)
    return torch.ops.quantized.linear_prepack(qweight, None if bias_O is None else bias_O.detach().float())


@functools.cache
def _reduce_range() -> bool:
    """fbgemm needs 7-bit activations to avoid int16 saturation unless the CPU has VNNI."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return not ("avx512_vnni" in flags or "avx_vnni" in flags)


def _int8_matmul(x: torch.Tensor, packed) -> torch.Tensor:
    lead = x.shape[:-1]
    y = _int8_matmul_2d(x.reshape(-1, x.shape[-1]).float().contiguous(), packed)
    return y.reshape(*lead, y.shape[-1])


def _int8_matmul_2d(x_MI: torch.Tensor, packed) -> torch.Tensor:
    # The overload directly, as in `raymoe.inference.packed`: less Python under the GIL per GEMM.
    return torch.ops.quantized.linear_dynamic.default(x_MI, packed, _reduce_range())


class Int8Linear(nn.Module):
    """Drop-in for an inference-only `nn.Linear` with INT8 per-output-channel weights."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed = _pack(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _int8_matmul(x, self._packed)


class Int8GroupedExperts(ExpertsOnThreads):
    """`GroupedExperts` with INT8 weights: per expert one gate+up GEMM (per-row scales, so the
    fused weight quantizes exactly as the two apart) and one down GEMM, optionally on shared threads."""

    def _prepare(self, w_OI: torch.Tensor):
        return _pack(w_OI, None)

    def _matmul(self, x_SI: torch.Tensor, prepared) -> torch.Tensor:
        return _int8_matmul_2d(x_SI, prepared)


def quantize_int8(model: ModelT, expert_threads: int = 1) -> ModelT:
    """Replaces every `nn.Linear` and `GroupedExperts` in `model` (in place) by its INT8 form.

    Inference only (the packed weights carry no gradients); CPU only (fbgemm / oneDNN kernels).
    `expert_threads` as in `raymoe.inference.packed.pack_onednn`.

    Returns:
        `model`, for chaining.
    """
    return replace_matmul_modules(model, Int8Linear, Int8GroupedExperts, expert_threads)
