"""Which dtype decodes faster on this CPU: the start-up measurement behind serving's `dtype: auto`.

A decode step multiplies a few rows by every weight it uses, so its speed is how fast the packed
GEMMs stream weights from memory. bf16 halves the bytes, but whether oneDNN's bf16 kernels turn
that into speed depends on the CPU: on an AVX512-BF16 EPYC, packed bf16 decode ran 1.25x fp32's;
on an AMX Xeon, bf16 through PyTorch's default kernels ran 0.72x. Flags alone do not decide it,
so the engine measures before it loads the model: one row times packed (4D, D) weights (an
expert's gate+up at the Mixtral shape, F = 2D) over more weight bytes than a cache holds, fp32
then bf16, best of a few passes each. About a second at d512; once per process.
"""

from __future__ import annotations

import functools
import time

import torch

from raymoe.inference.packed import _pack, _packed_matmul_2d

# fp32 weight bytes one pass streams: beyond the last-level cache of the CPUs this runs on, so
# the pass reads memory as a decode step does (bf16 passes stream half).
PROBE_BYTES = 128 * 2**20
PASSES = 3


@functools.cache
def decode_gemv_seconds(dim: int, threads: int) -> dict[str, float]:
    """Seconds of one pass of single-row packed GEMMs over PROBE_BYTES of (4*dim, dim) fp32
    weights (and the same matrices in bf16), with `threads` torch threads: {"fp32": s, "bf16": s}."""
    out = 4 * dim
    count = max(2, PROBE_BYTES // (out * dim * 4))
    generator = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            weights = [_pack(torch.randn(out, dim, generator=generator).to(dtype)) for _ in range(count)]
            x_1D = torch.randn(1, dim, generator=generator).to(dtype)
            best = float("inf")
            for _ in range(PASSES):
                start = time.perf_counter()
                for w in weights:
                    _packed_matmul_2d(x_1D, w, None)
                best = min(best, time.perf_counter() - start)
            seconds[name] = best
            del weights
        return seconds
    finally:
        torch.set_num_threads(before)
