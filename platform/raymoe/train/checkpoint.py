"""Sharded training checkpoints that any `ep x dp` layout can load, each worker reading only its share.

Layout under `checkpoint.uri` (any pyarrow filesystem: local path, s3://, gs://, ...):

    step-00000100/
      manifest.json                     written last: step, data position, layout, the key scheme's
                                        architecture, model + train config, and per file its
                                        sha256, size and header sha256 (expert files: their experts)
      dense.safetensors                 rank 0: non-expert weights + buffers (router bias) + their
                                        AdamW state
      experts-ep001-of-002.safetensors  the dp-replica-0 worker of each ep rank: its experts, one
                                        tensor per expert, + their AdamW state
      rng-00003.safetensors             every worker: its torch RNG state
    .tmp-step-00000200/                 a save in progress (ignored, removed by the next save)

Tensor names are the sharded names of `raymoe.models.state_dict_adapter` (Hugging Face names, one
tensor per expert, the balance bias kept for every architecture, AdamW state as
`optim.exp_avg.<name>`, `optim.exp_avg_sq.<name>`, `optim.step.<name>`). Every file records one
SHA-256 per tensor in its header (`raymoe.train.tensor_files`).

Saving: every worker streams its files tensor by tensor into the temp directory (no second copy of
its shard in memory), the digests are gathered on rank 0, which writes the manifest and renames
the directory into place (atomic on local and HDFS filesystems; on object stores the manifest,
written last, is the commit marker).

Resuming (`resume_checkpoint`): every worker reads the manifest, the headers of dense.safetensors
and of the expert files holding its experts (each header checked against the manifest), then only
the tensors it holds, each checked against its own digest. The workers agree (one all-reduce)
whether every share loaded; a checkpoint that failed anywhere is skipped with a warning and the
next older one tried, so the newest valid checkpoint wins and no worker reads what it does not
hold. `verify_checkpoint` checks whole files (tools, `raymoe export` of a checkpoint root).

Legend: E experts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from torch import nn

from raymoe.models.hf_config import hf_architecture_for
from raymoe.models.state_dict_adapter import HeldTensor, held_tensors, optimizer_key
from raymoe.parallel.groups import ParallelGroups
from raymoe.train.tensor_files import TensorFile, TensorFileError, write_tensor_file

log = logging.getLogger(__name__)

FORMAT = "raymoe-train-checkpoint/2"
DENSE_FILE = "dense.safetensors"
_STEP_DIR = re.compile(r"step-(\d{8})$")
_OPTIM_SLOTS = ("exp_avg", "exp_avg_sq")


class CheckpointCorrupt(RuntimeError):
    """A checkpoint file or tensor is missing or does not match its recorded checksum."""


@dataclass
class LoadedCheckpoint:
    """What a worker needs to continue after loading."""

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


def _fsync_local(fs: pafs.FileSystem, path: str) -> None:
    # pyarrow streams have no fsync; for local files force the bytes to disk before the rename.
    if isinstance(fs, pafs.LocalFileSystem):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)
    _fsync_local(fs, path)


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def expert_file_name(ep_rank: int, ep: int) -> str:
    return f"experts-ep{ep_rank:03d}-of-{ep:03d}.safetensors"


def model_architecture(model: nn.Module) -> str:
    """The architecture whose Hugging Face names the checkpoint uses for `model`."""
    return getattr(model, "hf_architecture", None) or hf_architecture_for(model.cfg)


def _state_entries(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                   held: list[HeldTensor]) -> list[tuple[str, torch.Tensor]]:
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

    arch = model_architecture(model)
    held = held_tensors(model, arch, training_state=True)
    written: dict[str, dict[str, Any]] = {}

    def put(name: str, entries: list[tuple[str, torch.Tensor]], **info: Any) -> None:
        path = f"{tmp}/{name}"
        with fs.open_output_stream(path) as out:
            result = write_tensor_file(out, entries)
        _fsync_local(fs, path)
        written[name] = {"sha256": result.sha256, "bytes": result.bytes,
                         "header_sha256": result.header_sha256, **info}

    if groups.rank == 0:
        put(DENSE_FILE, _state_entries(model, optimizer, [h for h in held if h.expert is None]))
    if groups.dp_rank == 0:
        experts = [h for h in held if h.expert is not None]
        put(expert_file_name(groups.ep_rank, layout.ep), _state_entries(model, optimizer, experts),
            experts=sorted({h.expert for h in experts}))
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
    """Reads every file of checkpoint `step` (in 1 MiB blocks) and checks it against the manifest.

    Returns:
        The manifest.

    Raises:
        CheckpointCorrupt: naming the file whose size or checksum differs (or that is missing).
    """
    fs, root = open_uri(uri)
    manifest = read_manifest(uri, step)
    for name, meta in manifest["files"].items():
        path = f"{root}/{step_dir_name(step)}/{name}"
        digest, size = hashlib.sha256(), 0
        try:
            with fs.open_input_stream(path) as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                    size += len(block)
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{path}: missing") from None
        if size != meta["bytes"] or "sha256:" + digest.hexdigest() != meta["sha256"]:
            raise CheckpointCorrupt(f"{path}: checksum mismatch (expected {meta['sha256']})")
    return manifest


def latest_valid_checkpoint(uri: str) -> int | None:
    """Newest complete checkpoint whose files match their checksums; bad ones are skipped loudly.

    Reads every file of the checkpoints it checks: for tools and export. Training resumes with
    `resume_checkpoint`, where each worker checks only what it reads.
    """
    for step in reversed(list_checkpoints(uri)):
        try:
            verify_checkpoint(uri, step)
            return step
        except (CheckpointCorrupt, ValueError, KeyError) as exc:
            log.warning("skipping checkpoint step %d under %s: %s", step, uri, exc)
    return None


class CheckpointReader:
    """The tensor files of one checkpoint, opened on demand, each header checked on opening.

    Args:
        uri: checkpoint root.
        step: which checkpoint.
    """

    def __init__(self, uri: str, step: int):
        self.fs, root = open_uri(uri)
        self.directory = f"{root}/{step_dir_name(step)}"
        try:
            self.manifest = json.loads(_read(self.fs, f"{self.directory}/manifest.json"))
        except (OSError, ValueError) as exc:
            raise CheckpointCorrupt(f"{self.directory}/manifest.json: {exc}") from None
        if self.manifest.get("format") != FORMAT:
            raise CheckpointCorrupt(f"{self.directory}: format {self.manifest.get('format')!r}, "
                                    f"this reader needs {FORMAT!r}")
        self.files: dict[str, dict[str, Any]] = self.manifest["files"]
        self.file_of_expert = {e: name for name, meta in self.files.items()
                               for e in meta.get("experts", [])}
        self._stack = ExitStack()
        self._open: dict[str, TensorFile] = {}

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def file(self, name: str) -> TensorFile:
        if name not in self._open:
            meta = self.files.get(name)
            if meta is None:
                raise CheckpointCorrupt(f"{self.directory}: manifest lists no {name}")
            path = f"{self.directory}/{name}"
            try:
                handle = self._stack.enter_context(self.fs.open_input_file(path))
                self._open[name] = TensorFile(handle, path, meta["header_sha256"])
            except FileNotFoundError:
                raise CheckpointCorrupt(f"{path}: missing") from None
            except TensorFileError as exc:
                raise CheckpointCorrupt(str(exc)) from None
        return self._open[name]

    def file_for(self, held: HeldTensor) -> TensorFile:
        """The file holding `held` (dense.safetensors, or the expert file listing its expert)."""
        if held.expert is None:
            return self.file(DENSE_FILE)
        name = self.file_of_expert.get(held.expert)
        if name is None:
            raise CheckpointCorrupt(f"{self.directory}: no expert file holds expert {held.expert}")
        return self.file(name)

    def read(self, file: TensorFile, key: str) -> torch.Tensor:
        try:
            return file.read(key)
        except KeyError:
            raise CheckpointCorrupt(f"{file.name}: no tensor {key!r}") from None
        except (TensorFileError, OSError) as exc:
            raise CheckpointCorrupt(str(exc)) from None


def load_checkpoint(
    uri: str,
    step: int,
    *,
    model: nn.Module,
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
                if param is None or id(param) not in group_of:
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

        same_layout = groups is not None and manifest["layout"] == {"ep": groups.layout.ep,
                                                                    "dp": groups.layout.dp}
        if same_layout:
            rng_file = reader.file(f"rng-{groups.rank:05d}.safetensors")
            torch.set_rng_state(reader.read(rng_file, "torch"))
        return LoadedCheckpoint(step=manifest["step"], data_position=manifest["data_position"],
                                path=reader.directory, layout=manifest["layout"],
                                metrics=manifest.get("metrics", {}))


def resume_checkpoint(
    uri: str,
    *,
    model: nn.Module,
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
            log.warning("skipping checkpoint step %d under %s: another worker could not read its "
                        "share", step, uri)
    optimizer.state.clear()
    return None


def _copy(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointCorrupt(f"tensor {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))
