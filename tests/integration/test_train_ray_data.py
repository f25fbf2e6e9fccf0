"""In a Ray session the training driver reads ingest shards through Ray Data, row for row as pyarrow."""

import numpy as np

from raymoe.data.shards import read_shard
from raymoe.train.data import prepare_tokens, read_rows_with_ray_data
from tests.unit.test_train_data import _ingest_dir


def test_ray_data_read_equals_direct_read_in_order(ray_cluster, tmp_path):
    src = _ingest_dir(tmp_path)
    paths = [str(p) for p in sorted((src / "shards").glob("train-*.parquet"))]
    direct = np.concatenate([read_shard(p) for p in paths])
    via_ray = read_rows_with_ray_data(paths)
    assert via_ray.dtype == direct.dtype and np.array_equal(via_ray, direct)
    data = prepare_tokens(str(src), seq_len=8, vocab_size=2048, cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(np.load(data.tokens_path), direct)
