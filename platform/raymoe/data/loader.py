"""Training loader: packed token shards -> LongTensor batches (B, seq_len + 1) for one rank.

Order: every epoch, the split's row groups are permuted and the rows inside each row group are
permuted (both seeded by (seed, epoch)), giving one global sequence of rows. Global step `s` takes
rows [s*B*W, (s+1)*B*W) of that sequence (W = world size) and rank r gets the r-th block of B,
so ranks never share a row within an epoch and the whole run is a pure function of
(seed, step): resuming is `TokenLoader(..., start_step=s)` or `load_state_dict`. Only one row group
per shard is held in memory at a time, so shards stream rather than load whole. The last partial
global batch of an epoch is dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raymoe.config import require
from raymoe.data.manifest import read_manifest, verify_shards
from raymoe.data.shards import read_row_group, row_group_sizes


@dataclass(kw_only=True)
class LoaderConfig:
    """Where the shards are and how to batch them (batch_size is per rank)."""

    data_dir: str
    batch_size: int
    split: str = "train"
    shuffle: bool = True
    seed: int = 0
    # Check every shard's SHA-256 against the manifest before reading.
    verify: bool = True
    # None = repeat forever.
    num_epochs: int | None = None

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"loader.batch_size must be >= 1, got {self.batch_size}")
        require(self.split in ("train", "val"), f"loader.split must be train or val, got {self.split!r}")
        require(
            self.num_epochs is None or self.num_epochs >= 1,
            f"loader.num_epochs must be null (repeat forever) or >= 1, got {self.num_epochs}",
        )


class TokenLoader:
    """Iterates LongTensor batches of shape (batch_size, row_len) for one rank."""

    def __init__(
        self,
        cfg: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        expected_tokenizer_hash: str | None = None,
    ):
        """Opens the shards of `cfg.split` listed in the manifest of `cfg.data_dir`.

        Args:
            cfg: loader settings.
            rank: this worker's index in [0, world_size).
            world_size: number of data-parallel readers.
            start_step: first global step to yield (resume point).
            expected_tokenizer_hash: if given, the manifest's tokenizer must match it.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.data_dir = Path(cfg.data_dir)
        manifest = read_manifest(self.data_dir)
        if expected_tokenizer_hash and manifest["tokenizer"]["hash"] != expected_tokenizer_hash:
            raise ValueError(
                f"{self.data_dir}: shards use tokenizer {manifest['tokenizer']['hash']},"
                f" expected {expected_tokenizer_hash}"
            )
        if cfg.verify:
            verify_shards(self.data_dir, manifest, split=cfg.split)
        self.row_len = int(manifest["row_len"])
        self.tokenizer_hash = manifest["tokenizer"]["hash"]
        self.row_groups: list[tuple[str, int, int]] = []  # (shard path, row group, rows)
        for shard in manifest["shards"]:
            if shard["split"] == cfg.split:
                path = str(self.data_dir / shard["path"])
                for i, n in enumerate(row_group_sizes(path)):
                    self.row_groups.append((path, i, n))
        self.num_rows = sum(n for _, _, n in self.row_groups)
        self.global_batch = cfg.batch_size * world_size
        self.steps_per_epoch = self.num_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{cfg.split} split of {self.data_dir} has {self.num_rows} rows, fewer than one "
                f"global batch of batch_size={cfg.batch_size} x world_size={world_size}"
            )
        self.step = start_step

    @functools.lru_cache(maxsize=4)  # noqa: B019 - keeps at most 4 (loader, epoch) entries alive
    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(row-group order, cumulative row ends in that order) for an epoch."""
        n = len(self.row_groups)
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n) if self.cfg.shuffle else np.arange(n)
        ends = np.cumsum([self.row_groups[i][2] for i in order])
        return order, ends

    @functools.lru_cache(maxsize=8)  # noqa: B019 - keeps at most 8 (loader, group, epoch) entries alive
    def _rows(self, group: int, epoch: int) -> np.ndarray:
        path, index, n = self.row_groups[group]
        rows = read_row_group(path, index)
        if self.cfg.shuffle:
            rows = rows[np.random.default_rng([self.cfg.seed, epoch, group]).permutation(n)]
        return rows

    def batch(self, step: int) -> torch.Tensor:
        """The batch this rank gets at global `step`: LongTensor (batch_size, row_len)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order, ends = self._epoch_layout(epoch)
        start = within * self.global_batch + self.rank * self.cfg.batch_size
        out = np.empty((self.cfg.batch_size, self.row_len), dtype=np.int64)
        filled = 0
        while filled < self.cfg.batch_size:
            pos = start + filled
            k = int(np.searchsorted(ends, pos, side="right"))
            first = int(ends[k - 1]) if k else 0
            rows = self._rows(int(order[k]), epoch)
            take = min(self.cfg.batch_size - filled, int(ends[k]) - pos)
            out[filled : filled + take] = rows[pos - first : pos - first + take]
            filled += take
        return torch.from_numpy(out)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while self.cfg.num_epochs is None or self.step < self.cfg.num_epochs * self.steps_per_epoch:
            batch = self.batch(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict:
        """Resume state: the next global step (plus what it is only valid with)."""
        return {
            "step": self.step,
            "seed": self.cfg.seed,
            "global_batch": self.global_batch,
            "tokenizer_hash": self.tokenizer_hash,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continues from a `state_dict`; the global batch size must be unchanged."""
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"loader state has global_batch={state['global_batch']}, this loader "
                f"has {self.global_batch} (batch_size x world_size)"
            )
        if state["seed"] != self.cfg.seed:
            raise ValueError(f"loader state has seed={state['seed']}, config has {self.cfg.seed}")
        self.step = int(state["step"])
