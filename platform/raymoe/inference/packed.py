"""fp32 / bf16 CPU inference with weights pre-packed for oneDNN (the `engine.cpu_kernels: onednn` path).

`torch.nn.functional.linear` on CPU fp32 goes to MKL's sgemm, which packs the weight matrix on
every call. Serving multiplies small activation blocks (a decode batch, an expert's few routed
rows) by large weights, so that packing is most of the work; and MKL picks slow kernels on AMD
CPUs. Measured on the 2-core EPYC of this project (2 threads, a 1024x512 or 2048x512 weight
that does not fit in L3): 8 rows 280 us with MKL against 77 us with a oneDNN weight reordered
once (`torch.ops.mkldnn._reorder_linear_weight`) and applied by `_linear_pointwise`; 256 rows
5.0 ms against 2.2 ms. This is the packing step that Inductor's CPU "freezing" does for linear
layers, done here once when the engine loads the model. Results equal the fp32 model's up to
summation order (~1e-6 relative).

`pack_onednn(model)` replaces each `nn.Linear` and `GroupedExperts` in place, like
`quantize_int8`; each expert's gate and up projections become one packed (2F, D) weight, so an
expert is two oneDNN calls. Weights keep their dtype: a bf16 model's are packed as bf16 (oneDNN
runs them on AVX512-BF16 / AMX units, reading half the bytes per decoded token). Inference only:
the packed weights are not parameters.

Shapes: S routed rows, D model dim, F expert hidden, O/I out/in features.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from raymoe.inference.cpu_threads import SharedThreads
from raymoe.inference.fast_attention import ThreadedDecodeAttention, can_fuse_qkv, fuse_qkv
from raymoe.models.attention import GQAttention, MLAttention
from raymoe.models.moe import GroupedExperts, rows_per_expert

ModelT = TypeVar("ModelT", bound=nn.Module)  # the model a function changes in place and returns

log = logging.getLogger(__name__)

# The row count oneDNN chooses its weight layout for; other counts still run, a little slower.
# Decode batches and the rows each expert receives are a few to a few tens.
BATCH_HINT = 8


# Weight dtypes oneDNN's packed linear takes here.
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available() -> bool:
    """Whether this torch build can run oneDNN's packed linear."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _pack(w_OI: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w_OI.detach().contiguous(), BATCH_HINT)


def _packed_matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    lead = x.shape[:-1]
    y = _packed_matmul_2d(x.reshape(-1, x.shape[-1]).contiguous(), packed, bias)
    return y.reshape(*lead, y.shape[-1])


def _packed_matmul_2d(x_MI: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The op's overload is called directly: an expert's GEMM is tens of microseconds, and the
    # Python around it holds the GIL that the other expert threads wait for.
    return torch.ops.mkldnn._linear_pointwise.default(x_MI, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """Drop-in for an inference-only fp32 or bf16 `nn.Linear`, weight packed for oneDNN."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed = _pack(linear.weight)
        self._bias = None if linear.bias is None else linear.bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_matmul(x, self._packed, self._bias)


class ExpertsOnThreads(nn.Module):
    """Inference experts as per-expert (gate+up (2F, D), down (D, F)) prepared weights.

    Subclasses prepare the weights (`_prepare`) and apply them (`_matmul`). With `threads` (see
    `raymoe.inference.cpu_threads`), the experts that received rows are the items the threads take
    as they free up; the GEMMs release the GIL, so the weight reads of different experts stream
    from memory in parallel.
    """

    def __init__(self, experts: GroupedExperts, threads: SharedThreads | None = None):
        super().__init__()
        self.expert_ids = list(experts.expert_ids)
        self.hidden_dim = experts.w_gate_EFD.shape[1]
        self.dim = experts.w_down_EDF.shape[1]
        self.weight_dtype = experts.w_gate_EFD.dtype  # of the weights prepared (re-placement reads alike)
        self._gate_up = [self._prepare(torch.cat([g, u])) for g, u in zip(experts.w_gate_EFD, experts.w_up_EFD)]
        self._down = [self._prepare(w) for w in experts.w_down_EDF]
        self._threads = threads or SharedThreads.start(1)

    @property
    def num_shared_threads(self) -> int:
        """Threads (the caller included) that run this layer's experts side by side."""
        return self._threads.count

    def _prepare(self, w_OI: torch.Tensor):
        raise NotImplementedError

    def _matmul(self, x_SI: torch.Tensor, prepared) -> torch.Tensor:
        """(S, I) contiguous rows times a prepared (O, I) weight -> (S, O)."""
        raise NotImplementedError

    def _expert(self, e: int, x_rows: torch.Tensor) -> torch.Tensor:
        gate_up = self._matmul(x_rows, self._gate_up[e])
        h = nn.functional.silu(gate_up[:, : self.hidden_dim])
        return self._matmul(h.mul_(gate_up[:, self.hidden_dim :]), self._down[e])

    def forward(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        work = rows_per_expert(x_SD, counts)
        if not work:
            return x_SD.new_zeros(0, self.dim)
        outputs: list = [None] * len(work)

        def run_expert(i: int) -> None:
            outputs[i] = self._expert(*work[i])

        # Below two experts per thread the hand-off costs about what it saves (one-token decode).
        self._threads.run(len(work), run_expert, max_threads=len(work) // 2)
        return torch.cat(outputs)


class PackedGroupedExperts(ExpertsOnThreads):
    """`GroupedExperts` with oneDNN-packed weights: per expert one gate+up call, one down call."""

    def _prepare(self, w_OI: torch.Tensor) -> torch.Tensor:
        return _pack(w_OI)

    def _matmul(self, x_SI: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return _packed_matmul_2d(x_SI, prepared, None)


def replace_matmul_modules(
    model: ModelT,
    linear: Callable[[nn.Linear], nn.Module],
    experts: Callable[[GroupedExperts, SharedThreads], nn.Module],
    expert_threads: int,
) -> ModelT:
    """Swaps every `nn.Linear` and `GroupedExperts` of `model` (in place) for an inference form.

    First fuses each GQA layer's q/k/v projections into one (`fast_attention.fuse_qkv`) where all
    three are plain `nn.Linear` (not LoRA-wrapped). `expert_threads` threads (`SharedThreads`),
    shared by all layers, run each layer's experts and its decode attention over long contexts.
    Refuses models with weights off the CPU; switches the model to eval mode. Returns `model`.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("packed CPU kernels need the model on CPU; move it there first (or leave them off on GPU)")
    model.eval()
    threads = SharedThreads.start(expert_threads)
    for module in list(model.modules()):
        if isinstance(module, GQAttention) and can_fuse_qkv(module):
            fuse_qkv(module)
        if isinstance(module, (GQAttention, MLAttention)):
            module.attend_fn = ThreadedDecodeAttention(threads)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, GroupedExperts))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear(module) if isinstance(module, nn.Linear) else experts(module, threads))
    return model


def pack_onednn(model: ModelT, expert_threads: int = 1) -> ModelT:
    """Packs every `nn.Linear` and `GroupedExperts` of `model` for oneDNN, in place.

    Args:
        model: an fp32 or bf16 model on CPU.
        expert_threads: threads that run a layer's experts side by side, and its decode
            attention when it reads many cached keys (1 = the caller only); the extra threads
            are shared by all layers.

    Raises:
        ValueError: the model is not all fp32 or all bf16 on CPU, or this torch has no oneDNN.
    """
    if not onednn_available():
        raise ValueError("cpu_kernels='onednn': this torch build has no oneDNN (mkldnn); use cpu_kernels='default'")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or not dtypes <= set(PACKED_DTYPES):
        raise ValueError(f"cpu_kernels='onednn' packs fp32 or bf16 weights; the model has {sorted(map(str, dtypes))}")
    return replace_matmul_modules(model, PackedLinear, PackedGroupedExperts, expert_threads)


def wants_packed_weights(cpu_kernels: str, model: nn.Module) -> bool:
    """Whether `model` should be packed: `cpu_kernels == "onednn"` and fp32 or bf16 weights on CPU.

    Warns and answers False when oneDNN is asked for but this torch build lacks it.
    """
    first = next(model.parameters())
    wanted = cpu_kernels == "onednn" and first.device.type == "cpu" and first.dtype in PACKED_DTYPES
    if wanted and not onednn_available():
        log.warning("cpu_kernels='onednn' but this torch has no oneDNN; using PyTorch's default kernels")
        return False
    return wanted
