"""Training tokens: ingest train shards read by position per worker, checked in the driver; batch order."""

import numpy as np
import pytest

from raymoe.data.manifest import write_manifest
from raymoe.data.shards import write_shard
from raymoe.train.data import TrainBatches, check_ingest_output
from tests.unit.ingest_output import write_ingest_output


def _ingest_dir(tmp_path, row_len=9, vocab_size=2048):
    # Prepare: two train shards and one val shard, rows numbered so their origin is visible.
    out = tmp_path / "ingest"
    (out / "shards").mkdir(parents=True)
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    shards = []
    for name, split, start in (("train-0", "train", 0), ("val-0", "val", 100), ("train-1", "train", 10)):
        rows = np.tile(np.arange(row_len, dtype=np.int32) + start, (4, 1))
        rows[:, 0] = start + np.arange(4)  # first token = a row id
        meta = write_shard(out / "shards" / f"{name}.parquet", rows, row_group_rows=2)
        shards.append({"path": f"shards/{name}.parquet", "split": split, **meta})
    write_manifest(
        out,
        {
            "format_version": 1,
            "tokenizer": {"dir": "tokenizer", "hash": "h", "vocab_size": vocab_size},
            "seq_len": row_len - 1,
            "row_len": row_len,
            "shards": shards,
            "counts": {},
        },
    )
    return out


def test_workers_read_every_train_row_once_per_epoch_and_no_val_row(tmp_path):
    src = _ingest_dir(tmp_path)
    data = check_ingest_output(str(src), seq_len=8, vocab_size=2048, global_batch_size=4)
    assert data.num_rows == 8 and data.tokenizer_dir.endswith("tokenizer")
    # 8 train rows (ids 0-3 and 10-13), global batch 4: an epoch is 2 micro-batches.
    got = []
    for index in range(2):
        for rank in range(2):
            inputs, targets = TrainBatches(
                str(src), seq_len=8, global_batch_size=4, world_size=2, rank=rank, seed=0
            ).batch(index)
            assert inputs.shape == (2, 8)
            assert (inputs[:, 1:] == targets[:, :-1]).all()  # targets are inputs shifted by one
            got += inputs[:, 0].tolist()
    assert sorted(got) == [0, 1, 2, 3, 10, 11, 12, 13]


def test_ingest_seq_len_mismatch_names_both(tmp_path):
    src = _ingest_dir(tmp_path)
    with pytest.raises(ValueError, match=r"data.seq_len=16 .* row_len=9"):
        check_ingest_output(str(src), seq_len=16, vocab_size=2048, global_batch_size=4)


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    src = _ingest_dir(tmp_path, vocab_size=4096)
    with pytest.raises(ValueError, match=r"vocabulary of 4096.*model.vocab_size=2048"):
        check_ingest_output(str(src), seq_len=8, vocab_size=2048, global_batch_size=4)


def test_tampered_shard_is_refused(tmp_path):
    src = _ingest_dir(tmp_path)
    shard = src / "shards" / "train-1.parquet"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="train-1"):
        check_ingest_output(str(src), seq_len=8, vocab_size=2048, global_batch_size=4)


def test_raw_text_is_not_training_data(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("plain text, never ingested")
    with pytest.raises(FileNotFoundError, match="run the ingest pipeline"):
        check_ingest_output(str(tmp_path / "corpus"), seq_len=8, vocab_size=2048, global_batch_size=4)


def test_batches_do_not_depend_on_the_layout(tmp_path):
    # 12 rows whose first token is the row id, in 3 shards of 2 row groups; global batch 4.
    rows = np.arange(12 * 5).reshape(12, 5).astype(np.int32)
    rows[:, 0] = np.arange(12)
    src = write_ingest_output(tmp_path / "data", rows, rows_per_shard=4, row_group_rows=2)

    def ids(world, index):
        got = []
        for rank in range(world):
            inputs, _ = TrainBatches(
                str(src), seq_len=4, global_batch_size=4, world_size=world, rank=rank, seed=0
            ).batch(index)
            got += inputs[:, 0].tolist()
        return got

    def epoch(first_index):  # the rows of 3 global batches from first_index on, one worker
        return [row for i in range(first_index, first_index + 3) for row in ids(1, i)]

    # The same 4 rows per global batch whatever the world size, each row once per epoch (3 batches).
    for index in range(3):
        assert ids(1, index) == ids(2, index) == ids(4, index)
    assert sorted(epoch(0)) == list(range(12))
    # The next epoch is another order of the same rows.
    assert sorted(epoch(3)) == list(range(12))
    assert epoch(3) != epoch(0)
