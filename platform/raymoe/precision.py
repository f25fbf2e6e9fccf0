"""The compute dtype by capability: bf16 where the hardware multiplies bf16 fast, fp32 elsewhere.

A CPU with AMX (`amx_bf16`) or AVX512-BF16 runs bf16 GEMMs several times faster than fp32 (on
the 2-core Xeon of issue 16: 1,000-2,000 GFLOP/s against 280-300), and reads half the weight
bytes per decoded token. A CPU without them (AVX2 only, plain AVX-512) emulates bf16 through fp32
conversions and is slower in bf16 than in fp32. So `auto`, the default of `train.precision` and
of the serving config's `dtype`, picks bf16 only where the flags say the units are there (or on a
CUDA device that supports bf16), and on a CPU only for models at least AUTO_BF16_MIN_DIM wide:
narrower GEMMs are too small for the bf16 units to pay for the conversions around them (measured
on an AMX Xeon, 2 cores: a d128 `debug` train step 0.67x of fp32, `bench.bench_bf16_loss`; a d512
Mixtral-shaped one 1.15x, `bench.bench_model`; d256 engine decode 0.73x, `bench.serve_load
--smoke`; the d256 engine's packed bf16 decode 0.88x on an AVX512-BF16 EPYC, where its GEMMs
alone ran 2x). The serving engine's `auto` on such a CPU, for a model as wide, is measured, not
assumed (`cpu_decode`): bf16 decode through PyTorch's default kernels lost to fp32 at each width
on an AMX Xeon, while oneDNN-packed bf16 ran 1.25x fp32 on an AVX512-BF16 EPYC; so with packed
kernels the engine times both dtypes' decode GEMMs at start-up (`raymoe.inference.
decode_dtype_probe`) and takes bf16 only when it is at least BF16_DECODE_MIN_SPEEDUP faster,
fp32 otherwise. `fp32` and `bf16` force
either. The choice and its reason are logged by the jobs and exported as the `dtype` label of
`raymoe_train_precision_info` and `raymoe_serve_engine_info`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

PrecisionSetting = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags of CPUs with bf16 arithmetic in hardware (Intel AMX, AVX512-BF16 on Intel
# Cooper Lake and later, AMD Zen 4 and later).
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Hidden size from which `auto` picks bf16 on such a CPU (see the module docstring).
AUTO_BF16_MIN_DIM = 512
# How much faster the start-up measurement must find bf16 decode for serving's `auto` to take it
# (bf16 also moves the logits a little, so a tie stays fp32).
BF16_DECODE_MIN_SPEEDUP = 1.1


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux); empty where there is no /proc/cpuinfo."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@dataclass(frozen=True)
class Precision:
    """A resolved compute dtype and why it was chosen."""

    name: Literal["fp32", "bf16"]
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def is_bf16(self) -> bool:
        return self.name == "bf16"

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def resolve_precision(
    setting: str,
    device: torch.device | str = "cpu",
    flags: frozenset[str] | None = None,
    model_dim: int | None = None,
    cpu_decode: bool = False,
    decode_probe: Callable[[], dict[str, float]] | None = None,
) -> Precision:
    """The dtype to compute in on `device` for `setting` ("auto", "fp32" or "bf16").

    Args:
        setting: the config value; "auto" decides by capability.
        device: where the model runs.
        flags: the CPU's flags (default: this machine's, from /proc/cpuinfo).
        model_dim: the model's hidden size; on a CPU, `auto` keeps models narrower than
            AUTO_BF16_MIN_DIM in fp32 (None: not considered).
        cpu_decode: for the serving engine: on a fast-bf16 CPU, `auto` for a model at least
            AUTO_BF16_MIN_DIM wide follows `decode_probe` (without one it is fp32: bf16 decode
            through PyTorch's default kernels measured 0.72-0.73x of fp32 on an AMX Xeon).
        decode_probe: returns the seconds of the same decode GEMMs in "fp32" and "bf16"
            (`raymoe.inference.decode_dtype_probe`); called only when it decides.
    """
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting != "auto":
        return Precision(setting, "set in the config")  # type: ignore[arg-type]
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "auto: this CUDA device supports bf16")
        return Precision("fp32", "auto: this CUDA device has no bf16")
    found = sorted(set(FAST_BF16_FLAGS) & (cpu_flags() if flags is None else flags))
    if found and model_dim is not None and model_dim < AUTO_BF16_MIN_DIM:
        return Precision(
            "fp32",
            f"auto: the CPU has {' and '.join(found)}, but a d{model_dim} model's GEMMs are too small "
            f"for bf16 to pay off (bf16 from d{AUTO_BF16_MIN_DIM})",
        )
    if found and cpu_decode:
        units = " and ".join(found)
        if decode_probe is None:
            return Precision("fp32", f"auto: the CPU has {units}, but unpacked bf16 decode measured slower than fp32")
        seconds = decode_probe()
        speedup = seconds["fp32"] / seconds["bf16"]
        measured = f"packed bf16 decode GEMMs measured {speedup:.2f}x fp32's at start-up"
        if speedup >= BF16_DECODE_MIN_SPEEDUP:
            return Precision("bf16", f"auto: the CPU has {units}; {measured}")
        return Precision("fp32", f"auto: the CPU has {units}, but {measured} (bf16 from {BF16_DECODE_MIN_SPEEDUP}x)")
    if found:
        return Precision("bf16", f"auto: the CPU has {' and '.join(found)}")
    return Precision("fp32", f"auto: the CPU has neither {' nor '.join(FAST_BF16_FLAGS)}, bf16 would be emulated")
