"""This machine's CPU as a planner fleet, measured in a few seconds: GEMM FLOP/s and read bandwidth.

The planner's roofline (`deploy.roofline`) needs a device's peak FLOP/s per operand type, its
memory bandwidth and its memory size. For a GPU these are datasheet numbers (`fleets/*.yaml`).
For the CPU the tests and benchmarks run on they are measured here instead, with the torch
threads the engine would use: the best of several square matmuls (fp32 and bf16; bf16 is several
times faster on AMX machines and slower on others, ENVIRONMENT.md), and the best of several sums
over a buffer much larger than the L3 cache (a read stream, which is what decoding does with the
weights). Being measured, these are achievable rates, not datasheet peaks: plan with efficiencies
of 1.0 (`cpu_roofline`).

The CPU is one device per node. Its network link is not measured: `inter_node_gb_per_s` is an
assumed 10 Gb/s Ethernet (1.25 GB/s), which matters only to plans with ep > 1; write a fleet file
with the real figure for those.
"""

from __future__ import annotations

import os
import time
from typing import Literal

import torch

from raymoe.deploy.fleet import FleetSpec
from raymoe.deploy.roofline import RooflineConfig

ASSUMED_LINK_GB_PER_S = 1.25


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, oneDNN/MKL kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` with the current torch threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _best(lambda: a @ b, repeats)


def read_bytes_per_s(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of summing an fp32 buffer of `megabytes` (a read stream past the caches)."""
    x = torch.ones(megabytes * 2**20 // 4)
    return x.numel() * 4 / _best(lambda: x.sum(), repeats)


def memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_name() -> str:
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_fleet(
    *, cpu: str, memory_gb: float, fp32_flops: float, bf16_flops: float, read_bytes_per_s: float, name: str = "cpu"
) -> FleetSpec:
    """A one-device-per-node fleet from measured rates (FLOP/s, bytes/s)."""
    return FleetSpec(
        name=name,
        gpu=cpu,
        memory_gb=memory_gb,
        peak_tflops={"fp32": fp32_flops / 1e12, "bf16": bf16_flops / 1e12},
        hbm_tb_per_s=read_bytes_per_s / 1e12,
        gpus_per_node=1,
        intra_node_gb_per_s=ASSUMED_LINK_GB_PER_S,
        inter_node_gb_per_s=ASSUMED_LINK_GB_PER_S,
    )


def measure_cpu_fleet(num_threads: int = 0) -> FleetSpec:
    """This CPU measured now (about 3 s), with `num_threads` torch threads (0 = torch's setting)."""
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        threads = torch.get_num_threads()
        return cpu_fleet(
            cpu=f"{cpu_name()}, {threads} threads",
            memory_gb=memory_bytes() / 1e9,
            fp32_flops=gemm_flops(torch.float32),
            bf16_flops=gemm_flops(torch.bfloat16),
            read_bytes_per_s=read_bytes_per_s(),
        )
    finally:
        torch.set_num_threads(before)


def cpu_roofline(dtype: Literal["bf16", "fp32"] = "fp32") -> RooflineConfig:
    """The roofline settings for a measured CPU fleet: weights, KV cache and attention in `dtype`
    (the engine serves fp32), efficiencies 1.0 (the fleet's rates are already achieved ones), no
    communication overlap to assume (ep = 1)."""
    return RooflineConfig(
        weight_dtype=dtype,
        kv_dtype=dtype,
        attention_dtype=dtype,
        gemm_efficiency=1.0,
        attention_efficiency=1.0,
        hbm_efficiency=1.0,
        link_efficiency=1.0,
        memory_utilization=0.9,
    )
