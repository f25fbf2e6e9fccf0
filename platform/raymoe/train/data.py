"""Training tokens: the ingest output, checked once by the driver, streamed to each worker by position.

Training reads only what `python -m pipelines.ingest` writes (decoded with quarantine, normalised,
PII-scrubbed, filtered, deduplicated, tokenized and packed): a directory holding `manifest.json`
and Parquet shards of rows of `seq_len + 1` tokens (inputs are row[:-1], targets row[1:]).

- The driver (`check_ingest_output`) reads the manifest and checks every train shard against its
  checksum (streamed in 1 MiB blocks), the row length against `data.seq_len` and the tokenizer's
  vocabulary against the model's. It never holds tokens.
- Each worker (`TrainBatches`) reads its rows from the shards itself, a Parquet row group at a
  time (`raymoe.data.loader.TokenLoader`). Global micro-batch g is rows [g*B, (g+1)*B) of one
  seeded order of the epoch (row groups shuffled, then the rows inside each), and worker r takes
  its 1/world contiguous slice. So the data position is one integer (micro-batches consumed),
  identical on every worker, and a run resumed at another ep x dp layout continues with exactly
  the tokens it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from raymoe.data.loader import LoaderConfig, TokenLoader
from raymoe.data.manifest import read_manifest, verify_shards


@dataclass
class IngestData:
    """An ingest output checked for a training run."""

    path: str
    manifest_path: str
    tokenizer_dir: str
    num_rows: int


def check_ingest_output(
    path: str, *, seq_len: int, vocab_size: int, global_batch_size: int, verify: bool = True
) -> IngestData:
    """Checks that the ingest output at `path` can feed a run, holding no tokens.

    Args:
        path: ingest output directory (manifest.json + shards).
        seq_len: tokens per training sequence; rows must hold seq_len + 1.
        vocab_size: the model's vocabulary; the tokenizer's must not exceed it.
        global_batch_size: sequences per micro-batch; the train split must hold at least one.
        verify: check every train shard's SHA-256 against the manifest (reads them through).

    Raises:
        FileNotFoundError: no manifest.json (the message says to run the ingest pipeline).
        ValueError: naming the field, the value and what was expected; or a shard that is missing
            or fails its checksum.
    """
    root = Path(path)
    manifest = read_manifest(root)
    if manifest["row_len"] != seq_len + 1:
        raise ValueError(
            f"data.seq_len={seq_len} needs rows of {seq_len + 1} tokens but the ingest output at "
            f"data.path={path!r} has row_len={manifest['row_len']} (pack.seq_len="
            f"{manifest['seq_len']})"
        )
    tokenizer = manifest["tokenizer"]
    if tokenizer.get("vocab_size", 0) > vocab_size:
        raise ValueError(
            f"data.path={path!r} was tokenized with a vocabulary of {tokenizer['vocab_size']}, "
            f"more than model.vocab_size={vocab_size}"
        )
    shards = [s for s in manifest["shards"] if s["split"] == "train"]
    if not shards:
        raise ValueError(f"data.path={path!r}: the ingest manifest lists no train shards")
    if verify:
        verify_shards(root, manifest, split="train")
    num_rows = sum(s["rows"] for s in shards)
    if num_rows < global_batch_size:
        raise ValueError(
            f"data.path={path!r} has {num_rows} train rows, fewer than data.global_batch_size={global_batch_size}"
        )
    return IngestData(
        path=str(root.resolve()),
        manifest_path=str((root / "manifest.json").resolve()),
        tokenizer_dir=str((root / tokenizer["dir"]).resolve()),
        num_rows=num_rows,
    )


class TrainBatches:
    """This worker's share of each global micro-batch, read from the shards by position.

    Args:
        path: ingest output directory (checked by `check_ingest_output` in the driver).
        seq_len: tokens per sequence (inputs).
        global_batch_size: sequences per micro-batch over all workers.
        world_size: number of workers sharing each micro-batch.
        rank: this worker's rank.
        seed: shuffling seed.
    """

    def __init__(self, path: str, *, seq_len: int, global_batch_size: int, world_size: int, rank: int, seed: int):
        # The driver verified the shards' checksums; each worker would otherwise reread them all.
        cfg = LoaderConfig(data_dir=path, batch_size=global_batch_size // world_size, seed=seed, verify=False)
        self.loader = TokenLoader(cfg, rank=rank, world_size=world_size)
        if self.loader.row_len != seq_len + 1:
            raise ValueError(
                f"{path}: expected rows of data.seq_len + 1 = {seq_len + 1} tokens, got {self.loader.row_len}"
            )

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `index` (0-based over the whole run) for this worker.

        Returns:
            (input_ids_BT, targets_BT), LongTensors of shape (global_batch_size / world, seq_len).
        """
        rows = self.loader.batch(index)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
