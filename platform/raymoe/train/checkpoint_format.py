"""The on-disk format of sharded training checkpoints: names, manifest, verification, reading.

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
SHA-256 per tensor in its header (`raymoe.models.tensor_files`).

`CheckpointReader` opens a checkpoint's files on demand, each header checked against the manifest
(what a resuming worker uses: see `raymoe.train.checkpoint`); `verify_checkpoint` checks whole
files (tools, `raymoe export` of a checkpoint root).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from contextlib import ExitStack
from typing import Any

import pyarrow.fs as pafs
import torch

from raymoe.models.hf_config import hf_architecture_for
from raymoe.models.state_dict_adapter import HeldTensor
from raymoe.models.tensor_files import TensorFile, TensorFileError
from raymoe.models.transformer import MoETransformer

log = logging.getLogger(__name__)

FORMAT = "raymoe-train-checkpoint/2"
DENSE_FILE = "dense.safetensors"
_STEP_DIR = re.compile(r"step-(\d{8})$")


class CheckpointCorrupt(RuntimeError):
    """A checkpoint file or tensor is missing or does not match its recorded checksum."""


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a URI or a local path (made absolute)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def fsync_local(fs: pafs.FileSystem, path: str) -> None:
    # pyarrow streams have no fsync; for local files force the bytes to disk before the rename.
    if isinstance(fs, pafs.LocalFileSystem):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(fs: pafs.FileSystem, directory: str, manifest: dict[str, Any]) -> None:
    """Writes `directory`/manifest.json (and on a local filesystem forces it to disk)."""
    path = f"{directory}/manifest.json"
    with fs.open_output_stream(path) as out:
        out.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    fsync_local(fs, path)


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def expert_file_name(ep_rank: int, ep: int) -> str:
    return f"experts-ep{ep_rank:03d}-of-{ep:03d}.safetensors"


def model_architecture(model: MoETransformer) -> str:
    """The architecture whose Hugging Face names the checkpoint uses for `model`."""
    return getattr(model, "hf_architecture", None) or hf_architecture_for(model.cfg)


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
        if (
            m
            and info.type == pafs.FileType.Directory
            and fs.get_file_info(f"{info.path}/manifest.json").type == pafs.FileType.File
        ):
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
            raise CheckpointCorrupt(
                f"{self.directory}: format {self.manifest.get('format')!r}, this reader needs {FORMAT!r}"
            )
        self.files: dict[str, dict[str, Any]] = self.manifest["files"]
        self.file_of_expert = {e: name for name, meta in self.files.items() for e in meta.get("experts", [])}
        self._stack = ExitStack()
        self._open: dict[str, TensorFile] = {}

    def __enter__(self) -> CheckpointReader:
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
