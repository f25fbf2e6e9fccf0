"""Training tokens: prepared once in the driver, read by position in every worker.

`prepare_tokens` turns `data.path` into one array of rows of seq_len + 1 tokens (`tokens.npy`,
inputs are row[:-1], targets row[1:]) plus a small manifest:
- an ingest output directory (manifest.json + Parquet token shards, raymoe.data): its `train`
  shards are verified against their checksums and read with Ray Data (in a Ray session), their
  rows used as they are (the ingest
  `pack.seq_len` must equal `data.seq_len`); the ingest tokenizer and manifest are recorded;
- a directory of raw text files (the shipped data/corpus): a byte-level BPE is trained on it (or
  `data.tokenizer` is used), each document is encoded followed by `<|endoftext|>`, and the stream
  is cut into rows.
The result is cached under `data.cache_dir` by a hash of the inputs, so restarts and resumes pack
nothing.

`PackedBatches` serves rows in a layout-independent shuffled order: global micro-batch g is rows
perm[g*B:(g+1)*B] and worker r takes its 1/world contiguous slice. So the data position is one
integer (micro-batches consumed), identical on every worker, and a run resumed at another ep x dp
layout continues with exactly the tokens it would have seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raymoe.atomic_io import atomic_write_bytes, sha256_file

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".json", ".c", ".h")


@dataclass
class PreparedData:
    """Paths of a packed token array and what it came from."""

    tokens_path: str
    tokenizer_dir: str
    manifest_path: str
    num_tokens: int
    max_token_id: int


def _input_files(root: Path) -> tuple[str, list[Path]]:
    if (root / "manifest.json").is_file():
        return "ingest", [root / "manifest.json"]
    texts = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not texts:
        raise FileNotFoundError(f"data.path={str(root)!r} holds no manifest.json or text files")
    return "text", texts


def prepare_tokens(path: str, *, seq_len: int, vocab_size: int, cache_dir: str,
                   tokenizer: str = "") -> PreparedData:
    """Packs `path` into a cached flat token array (see module docstring).

    Args:
        path: ingest output directory or a directory of text files.
        seq_len: tokens per training sequence; rows hold seq_len + 1.
        vocab_size: the model's vocabulary; a trained tokenizer gets this size, and every token
            id must be below it.
        cache_dir: where packed arrays are kept, keyed by a hash of the inputs.
        tokenizer: tokenizer directory for raw text; empty = train one on the text.

    Returns:
        The prepared data.
    """
    root = Path(path)
    kind, files = _input_files(root)
    key = hashlib.sha256()
    for f in files:
        st = f.stat()
        key.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    key.update(f"{kind}:{seq_len}:{vocab_size}:{tokenizer}".encode())
    out = Path(cache_dir) / key.hexdigest()[:16]
    manifest_path = out / "data_manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        return PreparedData(str(out / "tokens.npy"), manifest["tokenizer_dir"], str(manifest_path),
                            manifest["num_tokens"], manifest["max_token_id"])
    out.mkdir(parents=True, exist_ok=True)
    if kind == "ingest":
        tokens, tokenizer_dir = _ingest_rows(root, seq_len)
        source_manifest = str((root / "manifest.json").resolve())
    else:
        tokens, tokenizer_dir = _pack_text(files, out, seq_len, vocab_size, tokenizer)
        source_manifest = ""
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"data.path={path!r} has token id {int(tokens.max())} >= model.vocab_size={vocab_size}")
    buf = _npy_bytes(tokens)
    atomic_write_bytes(out / "tokens.npy", buf)
    manifest = {
        "source": str(root.resolve()), "kind": kind, "files": [str(f.relative_to(root)) for f in files],
        "num_tokens": int(tokens.size), "num_rows": int(tokens.shape[0]), "seq_len": seq_len,
        "max_token_id": int(tokens.max()) if tokens.size else -1,
        "tokens_sha256": sha256_file(out / "tokens.npy"), "tokenizer_dir": tokenizer_dir,
        "source_manifest": source_manifest,
    }
    # The manifest is written last: its presence marks a complete cache entry.
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return PreparedData(str(out / "tokens.npy"), tokenizer_dir, str(manifest_path),
                        manifest["num_tokens"], manifest["max_token_id"])


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _ingest_rows(root: Path, seq_len: int) -> tuple[np.ndarray, str]:
    from raymoe.data.manifest import read_manifest, verify_shards
    from raymoe.data.shards import read_shard

    manifest = read_manifest(root)
    if manifest["row_len"] != seq_len + 1:
        raise ValueError(
            f"data.seq_len={seq_len} needs rows of {seq_len + 1} tokens but the ingest output at "
            f"data.path={str(root)!r} has row_len={manifest['row_len']} (pack.seq_len="
            f"{manifest['seq_len']})")
    verify_shards(root, manifest, split="train")
    shards = [s for s in manifest["shards"] if s["split"] == "train"]
    if not shards:
        raise ValueError(f"data.path={str(root)!r}: the ingest manifest lists no train shards")
    paths = [str(root / s["path"]) for s in shards]
    rows = read_rows_with_ray_data(paths) if _ray_running() else np.concatenate([read_shard(p) for p in paths])
    return rows.astype(np.int32), str((root / manifest["tokenizer"]["dir"]).resolve())


def _ray_running() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def read_rows_with_ray_data(paths: list[str]) -> np.ndarray:
    """Token rows of Parquet shards read by Ray Data tasks, in shard then row order.

    The training driver reads the ingest shards this way (parallel reads on any pyarrow
    filesystem); the order is pinned so the packed array, and with it every worker's split, is the
    same on every run. Outside a Ray session (tools, unit tests) pyarrow reads them directly.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.read_parquet(paths, columns=["tokens"], shuffle=None)
    batches = [np.stack(batch["tokens"]) if batch["tokens"].dtype == object else batch["tokens"]
               for batch in ds.iter_batches(batch_format="numpy", batch_size=None)]
    return np.concatenate(batches)


def _pack_text(files: list[Path], out: Path, seq_len: int, vocab_size: int,
               tokenizer: str) -> tuple[np.ndarray, str]:
    from raymoe.data.tokenizer import eos_id, load_tokenizer, save_tokenizer, train_tokenizer

    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if tokenizer:
        tok, tok_dir = load_tokenizer(tokenizer), tokenizer
    else:
        tok = train_tokenizer(texts, vocab_size)
        tok_dir = str(save_tokenizer(tok, out / "tokenizer"))
    eos = eos_id(tok)
    parts = []
    for enc in tok.encode_batch(texts):
        parts.append(np.asarray(enc.ids + [eos], dtype=np.int32))
    stream = np.concatenate(parts)
    row_len = seq_len + 1
    num_rows = len(stream) // row_len
    return stream[:num_rows * row_len].reshape(num_rows, row_len), tok_dir


class PackedBatches:
    """Fixed-length windows of a flat token array, in a layout-independent shuffled order.

    Args:
        tokens_path: a `.npy` array of rows of seq_len + 1 token ids (memory-mapped).
        seq_len: tokens per sequence (inputs).
        global_batch_size: sequences per micro-batch over all workers.
        world_size: number of workers sharing each micro-batch.
        rank: this worker's rank.
        seed: shuffling seed.
    """

    def __init__(self, tokens_path: str, *, seq_len: int, global_batch_size: int, world_size: int,
                 rank: int, seed: int):
        self.tokens = np.load(tokens_path, mmap_mode="r")
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        if self.tokens.ndim != 2 or self.tokens.shape[1] != seq_len + 1:
            raise ValueError(f"{tokens_path}: expected rows of data.seq_len + 1 = {seq_len + 1} "
                             f"tokens, got shape {self.tokens.shape}")
        self.num_windows = self.tokens.shape[0]
        if self.num_windows < global_batch_size:
            raise ValueError(
                f"{tokens_path} has {self.num_windows} rows, fewer than "
                f"data.global_batch_size={global_batch_size}")
        self.batches_per_epoch = self.num_windows // global_batch_size
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `index` (0-based over the whole run) for this worker.

        Returns:
            (input_ids_BT, targets_BT), LongTensors of shape (global_batch_size / world, seq_len).
        """
        epoch, within = divmod(index, self.batches_per_epoch)
        perm = self._permutation(epoch)
        local = self.global_batch_size // self.world_size
        start = within * self.global_batch_size + self.rank * local
        rows = []
        for w in perm[start:start + local]:
            rows.append(np.asarray(self.tokens[int(w)], dtype=np.int64))
        window = torch.from_numpy(np.stack(rows))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()
