"""Read and write checkpoints in Hugging Face layout: config.json + safetensors (+ tokenizer files).

`load_hf` reads single-file and sharded (`model.safetensors.index.json`) checkpoints lazily, only
the tensors the model holds (all experts, or one expert-parallel worker's share), each by a ranged
read of its bytes (`raymoe.models.tensor_files`): no file is memory-mapped whole, so a worker's
memory and address space follow what it holds, not the artifact's size (safetensors' `safe_open`
maps each file, twice over while the first tensor is read: under an address-space limit a shard
worker would need room for the whole artifact); `save_hf` writes atomically (temp file, fsync,
rename), so a crash never leaves a torn file where a good one was, and
`transformers.AutoModelForCausalLM.from_pretrained` loads the result.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file

from raymoe.atomic_io import atomic_write, atomic_write_json
from raymoe.models.config import ModelConfig
from raymoe.models.hf_config import CheckpointError, config_from_hf, config_to_hf, hf_architecture_for
from raymoe.models.moe import GroupedExperts
from raymoe.models.state_dict_adapter import load_hf_state, native_to_hf
from raymoe.models.tensor_files import TensorFile, TensorFileError
from raymoe.models.transformer import MoETransformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def read_hf_config(path: str | Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, architecture) from `path/config.json`."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in {str(path)!r}")
    with config_path.open() as fh:
        return config_from_hf(json.load(fh))


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with index.open() as fh:
            return sorted({path / f for f in json.load(fh)["weight_map"].values()})
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {str(path)!r}")


def open_weight_file(stack: ExitStack, file: Path) -> TensorFile:
    """A ranged reader of one safetensors file of an artifact, closed with `stack`."""
    try:
        return TensorFile(stack.enter_context(file.open("rb")), str(file))
    except TensorFileError as exc:
        raise CheckpointError(str(exc)) from None


def read_weight(reader: TensorFile, key: str) -> torch.Tensor:
    """Tensor `key` of an artifact's file (a new CPU tensor of the stored dtype). Hugging Face
    files carry no per-tensor checksums, so none is checked.

    Raises:
        CheckpointError: a truncated tensor or an unsupported dtype.
    """
    try:
        return reader.read(key, verify=False)
    except TensorFileError as exc:
        raise CheckpointError(str(exc)) from None


def load_hf(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    expert_ids: list[int] | None = None,
    check: Callable[[MoETransformer], object] | None = None,
) -> MoETransformer:
    """Builds a MoETransformer from a Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 checkpoint.

    The model is built on the meta device and only what it holds is allocated and read: with
    `expert_ids`, each MoE layer holds just those routed experts (an expert-parallel worker's
    share) and the other experts' tensors are never read. Such a model runs once
    `raymoe.parallel.layout.shard_model_experts` has installed the all-to-all dispatcher for the
    same experts.

    Args:
        path: directory with config.json and safetensors weights.
        dtype: parameter dtype of the returned model.
        expert_ids: routed experts to hold (global ids, in local order); None = all.
        check: called with the model on the meta device (what it will hold, in `dtype`) before
            any tensor is allocated or read; it raises to refuse the load (a memory check).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: unsupported architecture, or a missing, unexpected, mis-shaped or
            truncated tensor (the message names the key and the shapes).
    """
    path = Path(path)
    cfg, arch = read_hf_config(path)
    with torch.device("meta"):
        model = MoETransformer(cfg).to(dtype)
        if expert_ids is not None:
            bad = [e for e in expert_ids if not 0 <= e < cfg.moe.num_experts]
            if bad:
                raise CheckpointError(f"expert_ids {bad} outside 0..{cfg.moe.num_experts - 1}")
            for moe in model.moe_layers():
                moe.experts = GroupedExperts(cfg.dim, cfg.moe.expert_hidden_dim, list(expert_ids)).to(dtype)
    if check is not None:
        check(model)
    model.materialize("cpu", init=False)
    with ExitStack() as stack:
        owner: dict[str, TensorFile] = {}  # tensor name -> the reader of its file
        for file in _weight_files(path):
            reader = open_weight_file(stack, file)
            owner.update(dict.fromkeys(reader.keys(), reader))
        load_hf_state(model, arch, lambda key: read_weight(owner[key], key), set(owner))
    model.hf_architecture = arch
    return model.eval()


def save_hf(model: MoETransformer, path: str | Path, tokenizer_dir: str | Path | None = None) -> str:
    """Writes `model` in Hugging Face layout; returns the architecture name used.

    The architecture is the one the model was loaded as, else the one its config matches
    (MLA -> DeepSeek-V3, gated shared expert -> Qwen2-MoE, qk-norm -> Qwen3-MoE, else Mixtral).
    Tokenizer files found in `tokenizer_dir` are copied beside the weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for moe in model.moe_layers():
        if len(moe.experts.expert_ids) != moe.cfg.num_experts:
            raise CheckpointError("save_hf needs every expert in one model; gather expert shards first")
    arch = getattr(model, "hf_architecture", None) or hf_architecture_for(model.cfg)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in native_to_hf(model, arch).items()}
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    save_hf_config(path, model.cfg, arch, tokenizer_dir)
    return arch


def save_hf_config(path: str | Path, cfg: ModelConfig, arch: str, tokenizer_dir: str | Path | None = None) -> None:
    """Writes config.json for `cfg` as `arch` and copies the tokenizer files found in `tokenizer_dir`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / "config.json", config_to_hf(cfg, arch))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                atomic_write(path / name, functools.partial(shutil.copyfile, src))
