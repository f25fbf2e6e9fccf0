"""Safetensors files written and read one tensor at a time, on any pyarrow filesystem.

The format is safetensors' own (an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the bytes), so `safetensors.safe_open` and
`transformers` read what `write_tensor_file` writes. What this module adds:
- streaming: the writer takes tensors one at a time (a `LazyTensor` is produced only when written)
  and the reader fills one tensor by a ranged read, so neither ever holds a second copy of a shard (safetensors' own
  `save`/`save_file` first copy every tensor to bytes; `safe_open` reads local files only);
- checksums at both levels: the file's SHA-256 (what a manifest lists) and, in the header's
  `__metadata__`, one SHA-256 per tensor, so a reader that takes a few tensors of a file checks
  exactly the bytes it read. The header itself is trusted through its own digest, which the
  caller keeps (checkpoint manifests do).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}
_DIGEST_PREFIX = "sha256:"


class TensorFileError(RuntimeError):
    """A tensor file or one of its tensors does not match its recorded checksum or layout."""


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


def _prepare(tensor: torch.Tensor) -> torch.Tensor:
    # A CPU, contiguous tensor is used as it is (a view of a parameter); anything else is copied
    # once, one tensor at a time.
    return tensor.detach().to("cpu").contiguous()


@dataclass
class LazyTensor:
    """A tensor to write that is produced only when its bytes are written (e.g. read elsewhere)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    get: Callable[[], torch.Tensor]


@dataclass
class WrittenFile:
    """What `write_tensor_file` wrote: the file's digest and size, and its header's digest."""

    sha256: str
    bytes: int
    header_sha256: str


def write_tensor_file(
    out: Any,
    entries: Iterable[tuple[str, torch.Tensor | LazyTensor]],
    *,
    metadata: dict[str, str] | None = None,
    tensor_digests: bool = True,
) -> WrittenFile:
    """Writes a safetensors file to the binary stream `out`, tensor by tensor.

    Args:
        out: a writable binary stream (`open(..., "wb")`, a pyarrow output stream).
        entries: (name, tensor or LazyTensor). A LazyTensor is produced once while its bytes are
            written (twice with `tensor_digests`), so it is held only for that long.
        metadata: string pairs for the header's `__metadata__`.
        tensor_digests: record each tensor's SHA-256 in `__metadata__` (`sha256:<name>`), which
            needs every tensor's bytes before the header: tensors are visited twice.

    Returns:
        Digests and size of what was written.
    """
    items = list(entries)
    meta = dict(metadata or {})
    header: dict[str, Any] = {}
    offset = 0
    for name, source in items:
        if isinstance(source, LazyTensor):
            dtype, shape = source.dtype, tuple(source.shape)
        else:
            dtype, shape = source.dtype, tuple(source.shape)
        if dtype not in DTYPES:
            raise TensorFileError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        if tensor_digests:
            view = _byte_view(_produce(name, source, dtype, shape))
            meta[f"{_DIGEST_PREFIX}{name}"] = _DIGEST_PREFIX + hashlib.sha256(view).hexdigest()
    if meta:
        header = {"__metadata__": meta, **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    head = struct.pack("<Q", len(text)) + text
    file_digest = hashlib.sha256(head)
    out.write(head)
    for name, source in items:
        entry = header[name]
        view = _byte_view(_produce(name, source, _TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"])))
        file_digest.update(view)
        out.write(view)
    return WrittenFile(
        sha256=_DIGEST_PREFIX + file_digest.hexdigest(),
        bytes=len(head) + offset,
        header_sha256=_DIGEST_PREFIX + hashlib.sha256(head).hexdigest(),
    )


def _produce(name: str, source: torch.Tensor | LazyTensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = _prepare(source.get() if isinstance(source, LazyTensor) else source)
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise TensorFileError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, announced as {dtype} {shape}")
    return tensor


class TensorFile:
    """Reads tensors of one safetensors file by ranged reads, checking each against its digest.

    Args:
        handle: a seekable binary file with `read_at(nbytes, offset)` (a pyarrow
            `RandomAccessFile`) or `seek` + `read`; `seek` + `readinto` are used for tensor bytes.
        name: how errors name the file.
        header_sha256: the expected digest of the header (length prefix included); None skips
            that check (then per-tensor digests are only as trustworthy as the header).
    """

    def __init__(self, handle: Any, name: str, header_sha256: str | None = None):
        self.handle = handle
        self.name = name
        raw_len = _read_at(handle, 8, 0)
        if len(raw_len) != 8:
            raise TensorFileError(f"{name}: truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", raw_len)
        text = _read_at(handle, length, 8)
        if len(text) != length:
            raise TensorFileError(f"{name}: truncated header")
        if header_sha256 is not None:
            got = _DIGEST_PREFIX + hashlib.sha256(raw_len + text).hexdigest()
            if got != header_sha256:
                raise TensorFileError(f"{name}: header checksum mismatch (expected {header_sha256})")
        try:
            header = json.loads(text)
        except ValueError as exc:
            raise TensorFileError(f"{name}: unreadable header: {exc}") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + length

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self.entries[key]["dtype"]
        if name not in _TORCH_DTYPES:
            raise TensorFileError(f"{self.name}: tensor {key!r} has unsupported dtype {name}")
        return _TORCH_DTYPES[name]

    def read(self, key: str, *, verify: bool = True) -> torch.Tensor:
        """Tensor `key`, read by its byte range (one new CPU tensor).

        Raises:
            KeyError: the file has no tensor `key`.
            TensorFileError: short read, unknown dtype, or (with `verify`) a checksum mismatch or
                a tensor without a recorded checksum.
        """
        entry = self.entries.get(key)
        if entry is None:
            raise KeyError(f"{self.name}: no tensor {key!r}")
        dtype = self.dtype(key)
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=dtype)
        view = _byte_view(out)
        if len(view) != end - begin:
            raise TensorFileError(
                f"{self.name}: tensor {key!r} spans {end - begin} bytes, its shape and dtype need {len(view)}"
            )
        if len(view):
            self.handle.seek(self.data_start + begin)
            got = self.handle.readinto(view)
            if got != len(view):
                raise TensorFileError(f"{self.name}: tensor {key!r} truncated ({got} of {len(view)} bytes)")
        if verify:
            want = self.metadata.get(f"{_DIGEST_PREFIX}{key}")
            if want is None:
                raise TensorFileError(f"{self.name}: no checksum recorded for tensor {key!r}")
            if _DIGEST_PREFIX + hashlib.sha256(view).hexdigest() != want:
                raise TensorFileError(f"{self.name}: tensor {key!r} checksum mismatch (expected {want})")
        return out


def _read_at(handle: Any, nbytes: int, offset: int) -> bytes:
    if hasattr(handle, "read_at"):
        return bytes(handle.read_at(nbytes, offset))
    handle.seek(offset)
    return handle.read(nbytes)
