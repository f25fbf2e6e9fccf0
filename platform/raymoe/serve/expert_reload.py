"""Gives a process's expert slots a new list of logical experts, reading only the missing ones.

Live re-placement (`raymoe.serve.shard_worker.ShardWorker.stage_placement`) changes which logical
experts each shard worker's slots hold. For every MoE layer the new module is built beside the
running one: experts the worker already holds are reused as they are (their packed oneDNN weights
too, no copy), and the ones it lacks are read from the artifact's safetensors by name
(`state_dict_adapter.expert_key`), each by a ranged read; no other tensor of the checkpoint is
read. The running module is untouched until the caller swaps the new one in.

Shapes: S slots this process holds, F expert hidden, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from raymoe.inference.packed import ExpertsOnThreads
from raymoe.models.hf_config import CheckpointError
from raymoe.models.hf_io import _weight_files, open_weight_file, read_weight
from raymoe.models.moe import GroupedExperts
from raymoe.models.state_dict_adapter import load_experts
from raymoe.models.tensor_files import TensorFile


class ExpertReader:
    """Reads single experts of single layers from an HF-format artifact (a context manager).

    Args:
        model_path: the artifact directory (config.json + safetensors) the model was loaded from.
        arch: the HF architecture the tensors are named for (`model.hf_architecture`).
    """

    def __init__(self, model_path: str | Path, arch: str):
        self.model_path = Path(model_path)
        self.arch = arch
        self._stack = ExitStack()
        self._owner: dict[str, TensorFile] = {}  # tensor name -> the ranged reader of its file
        self.num_read = 0

    def __enter__(self) -> ExpertReader:
        for file in _weight_files(self.model_path):
            reader = open_weight_file(self._stack, file)
            self._owner.update(dict.fromkeys(reader.keys(), reader))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _get(self, key: str) -> torch.Tensor:
        if key not in self._owner:
            raise CheckpointError(f"{self.model_path}: checkpoint is missing tensor {key!r}")
        return read_weight(self._owner[key], key)

    def read(self, layer_id: int, expert_ids: list[int], like: nn.Module) -> GroupedExperts:
        """A `GroupedExperts` of `expert_ids` (in that order) of transformer layer `layer_id`, with
        the dim, hidden size, dtype and device of `like` (a `GroupedExperts` or packed experts)."""
        dim, hidden, dtype, device = _shape_of(like)
        module = GroupedExperts(dim, hidden, list(expert_ids)).to(dtype=dtype)
        if expert_ids:
            load_experts(module, layer_id, self.arch, self._get)
            self.num_read += len(expert_ids)
        return module.to(device).requires_grad_(False)


def _shape_of(experts: nn.Module) -> tuple[int, int, torch.dtype, torch.device]:
    if isinstance(experts, GroupedExperts):
        w = experts.w_gate_EFD
        return w.shape[2], w.shape[1], w.dtype, w.device
    if isinstance(experts, ExpertsOnThreads):
        return experts.dim, experts.hidden_dim, experts.weight_dtype, torch.device("cpu")
    raise TypeError(f"cannot re-place experts held by a {type(experts).__name__}")


def experts_for_slots(
    current: GroupedExperts | ExpertsOnThreads, keep: list[int], read: Callable[[list[int]], GroupedExperts]
) -> GroupedExperts | ExpertsOnThreads:
    """A new experts module holding `keep` (slot order), built beside `current`.

    Args:
        current: the running `GroupedExperts` or packed `ExpertsOnThreads` module (not modified).
        keep: logical expert of each local slot in the new placement.
        read: `read(missing_ids) -> GroupedExperts` of the experts `current` lacks (in that order).

    Returns:
        A module of `current`'s kind: experts already held are shared with `current` (packed
        weights are reused, not re-packed), the others come from `read`.
    """
    held = list(current.expert_ids)
    missing = sorted(set(keep) - set(held))
    fresh = read(missing)
    if isinstance(current, GroupedExperts):

        def source(expert: int) -> tuple[GroupedExperts, int]:
            return (current, held.index(expert)) if expert in held else (fresh, missing.index(expert))

        dim, hidden, dtype, device = _shape_of(current)
        module = GroupedExperts(dim, hidden, list(keep)).to(dtype=dtype, device=device).requires_grad_(False)
        with torch.no_grad():
            for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
                target = getattr(module, name)
                for slot, expert in enumerate(keep):
                    owner, index = source(expert)
                    target[slot].copy_(getattr(owner, name)[index])
        return module
    if isinstance(current, ExpertsOnThreads):
        # The constructor prepares (packs) only the fresh experts; the held ones keep theirs.
        packed = type(current)(fresh, threads=current._threads)
        prepared = {e: (current._gate_up[i], current._down[i]) for i, e in enumerate(held)}
        prepared.update({e: (packed._gate_up[i], packed._down[i]) for i, e in enumerate(missing)})
        packed._gate_up = [prepared[e][0] for e in keep]
        packed._down = [prepared[e][1] for e in keep]
        packed.expert_ids = list(keep)
        return packed.eval()
    raise TypeError(f"cannot re-place experts held by a {type(current).__name__}")
