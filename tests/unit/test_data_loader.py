"""Training loader over hand-made shards whose rows say which row they are."""

import itertools

import numpy as np
import pytest
import torch

from raymoe.data.loader import LoaderConfig, TokenLoader
from raymoe.data.manifest import write_manifest
from raymoe.data.shards import write_shard

ROW_LEN = 5


@pytest.fixture
def data_dir(tmp_path):
    # Prepare: 22 train rows in shards of 10, 7, 5 (row groups of 4); row i is [i] * ROW_LEN.
    shards, start = [], 0
    for n, size in enumerate((10, 7, 5)):
        rows = np.repeat(np.arange(start, start + size, dtype=np.int32)[:, None], ROW_LEN, axis=1)
        info = write_shard(tmp_path / f"train/shard-{n:05d}.parquet", rows, 4)
        info.pop("written")
        shards.append({"path": f"train/shard-{n:05d}.parquet", "split": "train", **info})
        start += size
    write_manifest(
        tmp_path,
        {
            "format_version": 1,
            "tokenizer": {"hash": "sha256:t"},
            "seq_len": ROW_LEN - 1,
            "row_len": ROW_LEN,
            "counts": {},
            "shards": shards,
        },
    )
    return tmp_path


def _ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].tolist()


def test_unshuffled_order_and_rank_blocks(data_dir):
    cfg = LoaderConfig(data_dir=str(data_dir), batch_size=3, shuffle=False)
    r0, r1 = TokenLoader(cfg, 0, 2), TokenLoader(cfg, 1, 2)
    b = r0.batch(0)
    assert b.dtype == torch.int64 and b.shape == (3, ROW_LEN)
    # Global batch 6: step 0 is rows 0..5, rank 0 gets 0..2 and rank 1 gets 3..5.
    assert _ids(b) == [0, 1, 2] and _ids(r1.batch(0)) == [3, 4, 5]
    # Step 1 crosses from shard 0 (rows 0-9) into shard 1: rank 1 gets 9, 10, 11.
    assert _ids(r1.batch(1)) == [9, 10, 11]
    # 22 rows // 6 = 3 steps per epoch; epoch 1 starts over at row 0.
    assert r0.steps_per_epoch == 3 and _ids(r0.batch(3)) == [0, 1, 2]


def test_shuffled_epoch_covers_rows_once_across_ranks(data_dir):
    cfg = LoaderConfig(data_dir=str(data_dir), batch_size=3, seed=5)
    loaders = [TokenLoader(cfg, r, 2) for r in range(2)]
    seen = [i for s in range(3) for ld in loaders for i in _ids(ld.batch(s))]
    assert len(seen) == 18 and len(set(seen)) == 18  # 4 rows dropped with the partial batch
    assert seen != sorted(seen)
    epoch1 = [i for s in range(3, 6) for ld in loaders for i in _ids(ld.batch(s))]
    assert epoch1 != seen and len(set(epoch1)) == 18
    again = TokenLoader(cfg, 0, 2)
    assert _ids(again.batch(4)) == _ids(loaders[0].batch(4))


def test_resume_from_step_and_state(data_dir):
    cfg = LoaderConfig(data_dir=str(data_dir), batch_size=2, seed=1)
    straight = [_ids(b) for b in itertools.islice(iter(TokenLoader(cfg)), 8)]
    first = TokenLoader(cfg)
    head = [_ids(b) for b in itertools.islice(iter(first), 3)]
    resumed = TokenLoader(cfg)
    resumed.load_state_dict(first.state_dict())
    tail = [_ids(b) for b in itertools.islice(iter(resumed), 5)]
    assert head + tail == straight
    assert [_ids(b) for b in itertools.islice(iter(TokenLoader(cfg, start_step=3)), 5)] == tail


def test_num_epochs_bounds_iteration(data_dir):
    cfg = LoaderConfig(data_dir=str(data_dir), batch_size=5, num_epochs=2)
    assert len(list(TokenLoader(cfg))) == 2 * (22 // 5)


def test_errors(data_dir):
    with pytest.raises(ValueError, match="fewer than one global batch of batch_size=12 x world_size=2"):
        TokenLoader(LoaderConfig(data_dir=str(data_dir), batch_size=12), 0, 2)
    with pytest.raises(ValueError, match="rank must be in \\[0, 2\\), got 2"):
        TokenLoader(LoaderConfig(data_dir=str(data_dir), batch_size=1), 2, 2)
    with pytest.raises(ValueError, match="expected sha256:other"):
        TokenLoader(LoaderConfig(data_dir=str(data_dir), batch_size=1), expected_tokenizer_hash="sha256:other")
    state = TokenLoader(LoaderConfig(data_dir=str(data_dir), batch_size=2)).state_dict()
    with pytest.raises(ValueError, match="global_batch=2"):
        TokenLoader(LoaderConfig(data_dir=str(data_dir), batch_size=1)).load_state_dict(state)


def test_corrupt_shard_is_refused(data_dir):
    path = data_dir / "train/shard-00001.parquet"
    data = bytearray(path.read_bytes())
    data[20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard train/shard-00001\.parquet: sha256"):
        TokenLoader(LoaderConfig(data_dir=str(data_dir), batch_size=1))
