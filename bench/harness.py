"""Shared benchmark plumbing: timing, a GEMM peak measured in the same run, tables, results files.

Every figure a benchmark reports is a ratio against a peer measured in the same process, on the
same weights and threads, so the table means the same on a laptop and a CI box.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from raymoe.atomic_io import atomic_write_json

RESULTS_DIR = Path(__file__).parent / "results"


def best_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Fastest of `repeats` timed calls after `warmup` untimed ones (least disturbed by the OS)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_peak_flops(n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul on this machine with the current torch thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = best_seconds(lambda: a @ b, repeats=10, warmup=2)
    return 2 * n**3 / seconds


def print_table(title: str, header: list[str], rows: Sequence[Sequence[object]]) -> str:
    """Prints a markdown table (also returned, for the README)."""

    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(name: str, data: dict) -> Path:
    """Writes bench/results/<name>.json atomically, with the machine it was measured on."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    data = {
        **data,
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "processor": platform.processor(),
            "torch": torch.__version__,
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return atomic_write_json(RESULTS_DIR / f"{name}.json", data)


# The flags that decide a CPU's GEMM speed, oldest ISA first. AVX2 is the widest vector unit where
# AVX-512 is missing; AVX512-BF16 and AMX-BF16 decide fp32 vs bf16 speed (ENVIRONMENT.md: AMX
# machines run bf16 GEMMs 3.5-7x faster than fp32); AVX512-VNNI and AMX-INT8 decide the speed of
# the INT8 serving path's int8 x int8 -> int32 kernels.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and flags as /proc/cpuinfo gives them (empty flags elsewhere)."""
    model, flags = "unknown CPU", set[str]()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    return model, flags


def machine_line() -> str:
    """CPU model, cores and which of `CPU_FLAGS` it has."""
    model, flags = cpu_model_and_flags()
    have = [f for f in CPU_FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(have) or 'none of ' + ' '.join(CPU_FLAGS)}"


def run_line(dtype: str | torch.dtype, threads: int | str | None = None) -> str:
    """The line every benchmark prints once near the top and stores as `machine_line`.

    Args:
        dtype: what the benchmark computes in, as it would say it ("fp32", or "fp32 (INT8 rows:
            int8 weights)" where rows differ); a torch dtype is written without its `torch.` prefix.
        threads: the torch threads it runs with; a string where setups differ (written as given,
            e.g. "1 process x 2 threads vs 2 processes x 1 thread"); None: `torch.get_num_threads()`.

    Returns:
        `machine: <machine_line()>; torch <version>, <N> threads (or the string), dtype <dtype>`.
    """
    name = str(dtype).removeprefix("torch.")
    if threads is None:
        threads = torch.get_num_threads()
    if isinstance(threads, int):
        threads = f"{threads} thread{'' if threads == 1 else 's'}"
    return f"machine: {machine_line()}; torch {torch.__version__}, {threads}, dtype {name}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server the benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
