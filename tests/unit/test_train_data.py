"""Training tokens: ingest shards used row for row, checked against the manifest; batch order."""

import numpy as np
import pytest

from raymoe.data.manifest import write_manifest
from raymoe.data.shards import write_shard
from raymoe.train.data import PackedBatches, prepare_tokens


def _ingest_dir(tmp_path, row_len=9):
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
    write_manifest(out, {
        "format_version": 1, "tokenizer": {"dir": "tokenizer"}, "seq_len": row_len - 1,
        "row_len": row_len, "shards": shards, "counts": {},
    })
    return out


def test_ingest_train_shards_are_used_row_for_row(tmp_path):
    src = _ingest_dir(tmp_path)
    data = prepare_tokens(str(src), seq_len=8, vocab_size=2048, cache_dir=str(tmp_path / "cache"))
    rows = np.load(data.tokens_path)
    # 8 train rows (train-0 then train-1), no val rows; each row kept whole.
    assert rows.shape == (8, 9)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    assert data.tokenizer_dir.endswith("tokenizer")


def test_ingest_seq_len_mismatch_names_both(tmp_path):
    src = _ingest_dir(tmp_path)
    with pytest.raises(ValueError, match=r"data.seq_len=16 .* row_len=9"):
        prepare_tokens(str(src), seq_len=16, vocab_size=2048, cache_dir=str(tmp_path / "cache"))


def test_tampered_shard_is_refused(tmp_path):
    src = _ingest_dir(tmp_path)
    shard = src / "shards" / "train-1.parquet"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="train-1"):
        prepare_tokens(str(src), seq_len=8, vocab_size=2048, cache_dir=str(tmp_path / "cache"))


def test_batches_do_not_depend_on_the_layout(tmp_path):
    # 12 rows whose first token is the row id; global batch 4.
    rows = np.arange(12 * 5).reshape(12, 5).astype(np.int32)
    rows[:, 0] = np.arange(12)
    path = tmp_path / "tokens.npy"
    np.save(path, rows)

    def ids(world, index):
        got = []
        for rank in range(world):
            inputs, targets = PackedBatches(str(path), seq_len=4, global_batch_size=4,
                                            world_size=world, rank=rank, seed=0).batch(index)
            assert (inputs[:, 1:] == targets[:, :-1]).all()  # targets are inputs shifted by one
            got += inputs[:, 0].tolist()
        return got

    # The same 4 rows per global batch whatever the world size, each row once per epoch (3 batches).
    for index in range(3):
        assert ids(1, index) == ids(2, index) == ids(4, index)
    assert sorted(sum((ids(1, i) for i in range(3)), [])) == list(range(12))
    # The next epoch is another permutation of the same rows.
    assert sorted(sum((ids(1, i) for i in range(3, 6)), [])) == list(range(12))
