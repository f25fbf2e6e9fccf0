"""Sharded training checkpoints that any `ep x dp` layout can load.

Layout under `checkpoint.uri` (any pyarrow filesystem: local path, s3://, gs://, ...):

    step-00000100/
      manifest.json                     written last; lists every file with sha256 and size
      dense.safetensors                 rank 0: non-expert weights + buffers (router bias) + their
                                        AdamW state (`optim.exp_avg.<name>`, `optim.exp_avg_sq.<name>`)
      experts-ep001-of-002.safetensors  the dp-replica-0 worker of each ep rank: its experts, one
                                        tensor per expert (`layers.1.ffn.experts.5.w_gate_FD`) + their
                                        AdamW state under the same per-expert names
      rng-00003.safetensors             every worker: its torch RNG state
    .tmp-step-00000200/                 a save in progress (ignored, removed by the next save)

Saving: every worker writes its files into the temp directory, the checksums are gathered on
rank 0, which writes the manifest and renames the directory into place (atomic on local and HDFS
filesystems; on object stores the manifest, written last, is the commit marker). Loading: the
newest `step-*` whose manifest exists and whose files match their checksums; a checkpoint with a
bad checksum is skipped with a warning. Because experts are stored one tensor per expert, a
worker of any layout reads just the experts it holds (reshard on load).

Legend: E experts, F expert hidden, D model dim.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from raymoe.atomic_io import sha256_bytes
from raymoe.parallel.groups import ParallelGroups

log = logging.getLogger(__name__)

FORMAT = "raymoe-train-checkpoint/1"
_STEP_DIR = re.compile(r"step-(\d{8})$")
_EXPERT_PARAMS = {"w_gate_EFD": "w_gate_FD", "w_up_EFD": "w_up_FD", "w_down_EDF": "w_down_DF"}
_OPTIM_SLOTS = ("exp_avg", "exp_avg_sq")


class CheckpointCorrupt(RuntimeError):
    """A checkpoint file does not match the checksum in its manifest."""


@dataclass
class LoadedCheckpoint:
    """What a worker needs to continue after `load_checkpoint`."""

    step: int
    data_position: int
    path: str
    layout: dict[str, int]
    metrics: dict[str, float]


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a URI or a local path (made absolute)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)
        out.flush()
    # pyarrow streams have no fsync; for local files force the bytes to disk before the rename.
    if isinstance(fs, pafs.LocalFileSystem):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def expert_file_name(ep_rank: int, ep: int) -> str:
    return f"experts-ep{ep_rank:03d}-of-{ep:03d}.safetensors"


def expert_tensor_key(layer_id: int, expert: int, native_param: str) -> str:
    """Per-expert key of one matrix, e.g. `layers.1.ffn.experts.5.w_gate_FD`."""
    return f"layers.{layer_id}.ffn.experts.{expert}.{_EXPERT_PARAMS[native_param]}"


def _expert_modules(model: nn.Module):
    """(layer_id, GroupedExperts) for every MoE layer."""
    for layer_id, layer in enumerate(model.layers):
        experts = getattr(layer.ffn, "experts", None)
        if experts is not None and hasattr(experts, "expert_ids"):
            yield layer_id, experts


def _dense_names(model: nn.Module) -> list[str]:
    return [n for n in model.state_dict() if ".experts.w_" not in n]


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def dense_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """Non-expert weights, buffers and their optimizer state, by native name."""
    state = model.state_dict()
    out = {n: state[n].detach().cpu().contiguous() for n in _dense_names(model)}
    if optimizer is not None:
        names = _param_names(model)
        for p, st in optimizer.state.items():
            name = names[id(p)]
            if ".experts.w_" in name:
                continue
            for slot in _OPTIM_SLOTS:
                out[f"optim.{slot}.{name}"] = st[slot].detach().cpu().contiguous()
            out["optim.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    return out


def expert_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """This worker's experts and their optimizer state, one tensor per expert."""
    out: dict[str, torch.Tensor] = {}
    for layer_id, experts in _expert_modules(model):
        for native in _EXPERT_PARAMS:
            param = getattr(experts, native)
            st = optimizer.state.get(param, {}) if optimizer is not None else {}
            for local, expert in enumerate(experts.expert_ids):
                key = expert_tensor_key(layer_id, expert, native)
                out[key] = param.detach()[local].cpu().contiguous()
                for slot in _OPTIM_SLOTS:
                    if slot in st:
                        out[f"optim.{slot}.{key}"] = st[slot][local].detach().cpu().contiguous()
    return out


def save_checkpoint(
    uri: str,
    *,
    step: int,
    data_position: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: ParallelGroups,
    extra: dict[str, Any] | None = None,
    keep: int = 0,
) -> str:
    """Collectively writes checkpoint `step`; every worker must call it.

    Args:
        uri: checkpoint root (pyarrow URI or local path).
        step: optimizer steps completed.
        data_position: micro-batches consumed (same on every worker).
        model: this worker's (sharded) model.
        optimizer: its AdamW.
        groups: process groups of the layout.
        extra: JSON-able metadata for the manifest (train config, data manifest, ...).
        keep: complete checkpoints to keep afterwards (0 = all).

    Returns:
        The checkpoint directory path (on its filesystem).
    """
    fs, root = open_uri(uri)
    layout = groups.layout
    tmp = f"{root}/.tmp-{step_dir_name(step)}"
    final = f"{root}/{step_dir_name(step)}"
    if groups.rank == 0:
        fs.create_dir(root, recursive=True)
        fs.delete_dir_contents(tmp, missing_dir_ok=True)
        fs.create_dir(tmp, recursive=True)
    _barrier(groups)

    written: dict[str, dict[str, Any]] = {}

    def put(name: str, tensors: dict[str, torch.Tensor]) -> None:
        data = st_save(tensors)
        _write(fs, f"{tmp}/{name}", data)
        written[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}

    if groups.rank == 0:
        put("dense.safetensors", dense_tensors(model, optimizer))
    if groups.dp_rank == 0:
        name = expert_file_name(groups.ep_rank, layout.ep)
        put(name, expert_tensors(model, optimizer))
    put(f"rng-{groups.rank:05d}.safetensors", {"torch": torch.get_rng_state()})

    files = _gather_dicts(written, groups)
    if groups.rank == 0:
        manifest = {
            "format": FORMAT,
            "step": step,
            "data_position": data_position,
            "layout": {"ep": layout.ep, "dp": layout.dp},
            "files": files,
            "created_unix": time.time(),
            **(extra or {}),
        }
        _write(fs, f"{tmp}/manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
        if fs.get_file_info(final).type != pafs.FileType.NotFound:
            # This step exists already (e.g. it was skipped as corrupt and has been redone): move
            # it aside first, so a crash in between leaves the old one, never nothing.
            aside = f"{root}/.old-{step_dir_name(step)}"
            fs.delete_dir_contents(aside, missing_dir_ok=True)
            fs.move(final, aside)
            fs.move(tmp, final)
            fs.delete_dir(aside)
        else:
            fs.move(tmp, final)
        if keep:
            for old in list_checkpoints(uri)[:-keep]:
                fs.delete_dir(f"{root}/{step_dir_name(old)}")
    _barrier(groups)
    return final


def _barrier(groups: ParallelGroups) -> None:
    if groups.distributed:
        dist.barrier()


def _gather_dicts(d: dict, groups: ParallelGroups) -> dict:
    if not groups.distributed:
        return dict(d)
    gathered: list[dict] = [None] * groups.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, d)
    merged: dict = {}
    for part in gathered:
        merged.update(part)
    return merged


def list_checkpoints(uri: str) -> list[int]:
    """Steps of the `step-*` directories that have a manifest, oldest first."""
    fs, root = open_uri(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except FileNotFoundError:
        return []
    steps = []
    for info in infos:
        m = _STEP_DIR.search(info.path)
        if m and info.type == pafs.FileType.Directory:
            if fs.get_file_info(f"{info.path}/manifest.json").type == pafs.FileType.File:
                steps.append(int(m.group(1)))
    return sorted(steps)


def read_manifest(uri: str, step: int) -> dict[str, Any]:
    fs, root = open_uri(uri)
    return json.loads(_read(fs, f"{root}/{step_dir_name(step)}/manifest.json"))


def verify_checkpoint(uri: str, step: int) -> dict[str, Any]:
    """Reads every file of checkpoint `step` and checks it against the manifest.

    Returns:
        The manifest.

    Raises:
        CheckpointCorrupt: naming the file whose size or checksum differs (or that is missing).
    """
    fs, root = open_uri(uri)
    manifest = read_manifest(uri, step)
    for name, meta in manifest["files"].items():
        path = f"{root}/{step_dir_name(step)}/{name}"
        try:
            data = _read(fs, path)
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{path}: missing") from None
        if len(data) != meta["bytes"] or sha256_bytes(data) != meta["sha256"]:
            raise CheckpointCorrupt(f"{path}: checksum mismatch (expected {meta['sha256']})")
    return manifest


def latest_valid_checkpoint(uri: str) -> int | None:
    """Newest complete checkpoint whose files match their checksums; bad ones are skipped loudly."""
    for step in reversed(list_checkpoints(uri)):
        try:
            verify_checkpoint(uri, step)
            return step
        except (CheckpointCorrupt, ValueError, KeyError) as exc:
            log.warning("skipping checkpoint step %d under %s: %s", step, uri, exc)
    return None


def _load_file(fs: pafs.FileSystem, path: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    data = _read(fs, path)
    if sha256_bytes(data) != meta["sha256"]:
        raise CheckpointCorrupt(f"{path}: checksum mismatch (expected {meta['sha256']})")
    return st_load(data)


def load_checkpoint(
    uri: str,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    groups: ParallelGroups | None,
) -> LoadedCheckpoint:
    """Fills this worker's (sharded) model and optimizer from checkpoint `step`, at any layout.

    The worker reads dense.safetensors and only the expert files holding its experts; each file
    read is checked against the manifest. RNG state is restored when the layout is unchanged.
    """
    fs, root = open_uri(uri)
    directory = f"{root}/{step_dir_name(step)}"
    manifest = read_manifest(uri, step)
    files = manifest["files"]
    dense = _load_file(fs, f"{directory}/dense.safetensors", files["dense.safetensors"])

    needed = {e for _, experts in _expert_modules(model) for e in experts.expert_ids}
    saved_ep = manifest["layout"]["ep"]
    expert_store: dict[str, torch.Tensor] = {}
    for ep_rank in range(saved_ep):
        name = expert_file_name(ep_rank, saved_ep)
        if name not in files:
            raise CheckpointCorrupt(f"{directory}: manifest lists no {name}")
        tensors = _load_file(fs, f"{directory}/{name}", files[name])
        if not needed & _experts_in(tensors):
            continue
        expert_store.update(tensors)

    names = _param_names(model)
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for name in _dense_names(model):
            if name not in dense:
                raise CheckpointCorrupt(f"{directory}/dense.safetensors lacks {name!r}")
            _copy(state[name], dense[name], name)
        for layer_id, experts in _expert_modules(model):
            for native in _EXPERT_PARAMS:
                param = getattr(experts, native)
                for local, expert in enumerate(experts.expert_ids):
                    key = expert_tensor_key(layer_id, expert, native)
                    if key not in expert_store:
                        raise CheckpointCorrupt(f"{directory}: no tensor {key!r} in any expert file")
                    _copy(param[local], expert_store[key], key)

    if optimizer is not None and "optim.step" in dense:
        step_count = dense["optim.step"].reshape(()).clone()
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                slots = {}
                for slot in _OPTIM_SLOTS:
                    if ".experts.w_" in name:
                        layer_id = int(name.split(".")[1])
                        native = name.rsplit(".", 1)[1]
                        experts = model.layers[layer_id].ffn.experts
                        keys = [f"optim.{slot}.{expert_tensor_key(layer_id, e, native)}"
                                for e in experts.expert_ids]
                        if all(k in expert_store for k in keys):
                            slots[slot] = torch.stack([expert_store[k] for k in keys])
                    elif f"optim.{slot}.{name}" in dense:
                        slots[slot] = dense[f"optim.{slot}.{name}"].clone()
                # A parameter that never had a gradient has no AdamW state to restore.
                if len(slots) == len(_OPTIM_SLOTS):
                    st = optimizer.state[p]
                    st["step"] = step_count.clone()
                    for slot, value in slots.items():
                        st[slot] = value.to(p.device, p.dtype)

    same_layout = groups is not None and manifest["layout"] == {"ep": groups.layout.ep,
                                                                "dp": groups.layout.dp}
    if same_layout:
        rng_name = f"rng-{groups.rank:05d}.safetensors"
        rng = _load_file(fs, f"{directory}/{rng_name}", files[rng_name])
        torch.set_rng_state(rng["torch"])
    return LoadedCheckpoint(step=manifest["step"], data_position=manifest["data_position"],
                            path=directory, layout=manifest["layout"],
                            metrics=manifest.get("metrics", {}))


def _experts_in(tensors: dict[str, torch.Tensor]) -> set[int]:
    found = set()
    for key in tensors:
        m = re.search(r"\.experts\.(\d+)\.", key)
        if m:
            found.add(int(m.group(1)))
    return found


def _copy(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointCorrupt(f"tensor {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))
