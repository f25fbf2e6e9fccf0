"""Saving and resuming sharded training checkpoints: any `ep x dp` layout loads any other, each
worker reading only its share. The files and manifest are `raymoe.train.checkpoint_format`'s.

Saving: every worker streams its files tensor by tensor into the temp directory (no second copy of
its shard in memory), the digests are gathered on rank 0, which writes the manifest and renames
the directory into place (atomic on local and HDFS filesystems; on object stores the manifest,
written last, is the commit marker).

Resuming (`resume_checkpoint`): every worker reads the manifest, the headers of dense.safetensors
and of the expert files holding its experts (each header checked against the manifest), then only
the tensors it holds, each checked against its own digest. The workers agree (one all-reduce)
whether every share loaded; a checkpoint that failed anywhere is skipped with a warning and the
next older one tried, so the newest valid checkpoint wins and no worker reads what it does not
hold.

Legend: E experts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from raymoe.models.state_dict_adapter import HeldTensor, held_tensors, optimizer_key
from raymoe.models.tensor_files import write_tensor_file
from raymoe.models.transformer import MoETransformer
from raymoe.parallel.groups import ParallelGroups
from raymoe.train.checkpoint_format import (
    DENSE_FILE,
    FORMAT,
    CheckpointCorrupt,
    CheckpointReader,
    expert_file_name,
    fsync_local,
    list_checkpoints,
    model_architecture,
    open_uri,
    step_dir_name,
    write_manifest,
)

log = logging.getLogger(__name__)

_OPTIM_SLOTS = ("exp_avg", "exp_avg_sq")


@dataclass
class LoadedCheckpoint:
    """What a worker needs to continue after loading."""

    step: int
    data_position: int
    path: str
    layout: dict[str, int]
    metrics: dict[str, float]


def _state_entries(
    model: MoETransformer, optimizer: torch.optim.Optimizer | None, held: list[HeldTensor]
) -> list[tuple[str, torch.Tensor]]:
    """(sharded name, tensor view) of the held tensors and their AdamW state."""
    state = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters())
    out = []
    for h in held:
        out.append((h.key, h.view(state[h.native].detach())))
        param = params.get(h.native)
        slots = optimizer.state.get(param, {}) if optimizer is not None and param is not None else {}
        if all(slot in slots for slot in _OPTIM_SLOTS):
            for slot in _OPTIM_SLOTS:
                out.append((optimizer_key(slot, h.key), h.view(slots[slot].detach())))
            step = torch.as_tensor(slots["step"]).detach().to("cpu", torch.float32).reshape(1)
            out.append((optimizer_key("step", h.key), step))
    return out


def save_checkpoint(
    uri: str,
    *,
    step: int,
    data_position: int,
    model: MoETransformer,
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

    arch = model_architecture(model)
    held = held_tensors(model, arch, training_state=True)
    written: dict[str, dict[str, Any]] = {}

    def put(name: str, entries: list[tuple[str, torch.Tensor]], **info: Any) -> None:
        path = f"{tmp}/{name}"
        with fs.open_output_stream(path) as out:
            result = write_tensor_file(out, entries)
        fsync_local(fs, path)
        written[name] = {"sha256": result.sha256, "bytes": result.bytes, "header_sha256": result.header_sha256, **info}

    if groups.rank == 0:
        put(DENSE_FILE, _state_entries(model, optimizer, [h for h in held if h.expert is None]))
    if groups.dp_rank == 0:
        experts = [h for h in held if h.expert is not None]
        put(
            expert_file_name(groups.ep_rank, layout.ep),
            _state_entries(model, optimizer, experts),
            experts=sorted({h.expert for h in experts}),
        )
    put(f"rng-{groups.rank:05d}.safetensors", [("torch", torch.get_rng_state())])

    files = _gather_dicts(written, groups)
    if groups.rank == 0:
        manifest = {
            "format": FORMAT,
            "step": step,
            "data_position": data_position,
            "layout": {"ep": layout.ep, "dp": layout.dp},
            "architecture": arch,
            "files": files,
            "created_unix": time.time(),
            **(extra or {}),
        }
        write_manifest(fs, tmp, manifest)
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


def load_checkpoint(
    uri: str,
    step: int,
    *,
    model: MoETransformer,
    optimizer: torch.optim.Optimizer | None,
    groups: ParallelGroups | None,
) -> LoadedCheckpoint:
    """Fills this worker's (sharded) model and optimizer from checkpoint `step`, at any layout.

    Reads the headers of dense.safetensors and of the expert files holding this model's experts,
    then exactly the tensors the model holds (and their AdamW state when `optimizer` is given),
    each checked against its digest. RNG state is restored when the layout is unchanged. With
    `groups=None` (tools) nothing but the model's tensors is read.

    Raises:
        CheckpointCorrupt: a missing file or tensor, a checksum or shape mismatch.
    """
    with CheckpointReader(uri, step) as reader:
        manifest = reader.manifest
        arch = manifest.get("architecture", model_architecture(model))
        state = model.state_dict(keep_vars=True)
        params = dict(model.named_parameters())
        group_of = {id(p): g for g in (optimizer.param_groups if optimizer else []) for p in g["params"]}
        with torch.no_grad():
            for held in held_tensors(model, arch, training_state=True):
                file = reader.file_for(held)
                _copy(held.view(state[held.native]), reader.read(file, held.key), held.key)
                param = params.get(held.native)
                if optimizer is None or param is None or id(param) not in group_of:
                    continue
                # A parameter that never had a gradient has no AdamW state to restore.
                if optimizer_key("exp_avg", held.key) not in file:
                    continue
                slots = optimizer.state[param]
                if "exp_avg" not in slots:
                    for slot in _OPTIM_SLOTS:
                        slots[slot] = torch.zeros_like(param, memory_format=torch.preserve_format)
                for slot in _OPTIM_SLOTS:
                    key = optimizer_key(slot, held.key)
                    _copy(held.view(slots[slot]), reader.read(file, key), key)
                step_value = reader.read(file, optimizer_key("step", held.key)).reshape(())
                group = group_of[id(param)]
                # AdamW keeps `step` on the parameter's device for fused / capturable updates.
                on_device = group.get("fused") or group.get("capturable")
                slots["step"] = step_value.to(param.device if on_device else "cpu", torch.float32)

        if groups is not None and manifest["layout"] == {"ep": groups.layout.ep, "dp": groups.layout.dp}:
            rng_file = reader.file(f"rng-{groups.rank:05d}.safetensors")
            torch.set_rng_state(reader.read(rng_file, "torch"))
        return LoadedCheckpoint(
            step=manifest["step"],
            data_position=manifest["data_position"],
            path=reader.directory,
            layout=manifest["layout"],
            metrics=manifest.get("metrics", {}),
        )


def resume_checkpoint(
    uri: str,
    *,
    model: MoETransformer,
    optimizer: torch.optim.Optimizer,
    groups: ParallelGroups,
) -> LoadedCheckpoint | None:
    """Collectively loads the newest checkpoint under `uri` that every worker reads without error.

    Each worker reads only its share (see `load_checkpoint`); a checkpoint that fails on any
    worker is skipped with a warning naming the step and the reason. When none loads, the
    optimizer state is cleared and the model's weights are undefined (a failed load may have
    filled some): the caller initialises them.

    Returns:
        The loaded checkpoint, or None to start from step 0.
    """
    steps = list_checkpoints(uri) if groups.rank == 0 else None
    if groups.distributed:
        box = [steps]
        dist.broadcast_object_list(box, src=0)
        steps = box[0]
    for step in reversed(steps or []):
        error = None
        try:
            loaded = load_checkpoint(uri, step, model=model, optimizer=optimizer, groups=groups)
        except CheckpointCorrupt as exc:
            error = str(exc)
        failed = torch.tensor([0 if error is None else 1], dtype=torch.int32)
        if groups.distributed:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if not int(failed):
            return loaded
        if error is not None:
            log.warning("skipping checkpoint step %d under %s: %s", step, uri, error)
        elif groups.rank == 0:
            log.warning("skipping checkpoint step %d under %s: another worker could not read its share", step, uri)
    optimizer.state.clear()
    return None


def _copy(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointCorrupt(f"tensor {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))
