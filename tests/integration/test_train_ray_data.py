"""Training tokens never pass through the driver: Ray Train workers read their rows from the shards.

The driver's shard readers are made to fail for the whole run; the run still trains, so every row
a step used was read in a worker process. The driver only checks the manifest and the shards'
checksums (hashing streams the files; it keeps no tokens).
"""

import numpy as np

from raymoe.config import from_dict
from raymoe.train.config import TrainConfig
from raymoe.train.loop import run_training
from tests.unit.ingest_output import write_ingest_output


def test_driver_reads_no_tokens(ray_cluster, tmp_path, monkeypatch):
    # Prepare: 32 rows in 4 shards; any read of token rows in this (driver) process fails.
    rows = np.random.default_rng(0).integers(3, 2048, size=(32, 33)).astype(np.int32)
    data = write_ingest_output(tmp_path / "data", rows, rows_per_shard=8)

    def refuse(*args, **kwargs):
        raise AssertionError("the driver read token rows")

    import pyarrow.parquet

    import raymoe.data.loader
    import raymoe.data.shards

    for module, name in (
        (raymoe.data.shards, "read_shard"),
        (raymoe.data.shards, "read_row_group"),
        (raymoe.data.loader, "read_row_group"),
        (pyarrow.parquet, "read_table"),
        (pyarrow.parquet.ParquetFile, "read_row_group"),
    ):
        monkeypatch.setattr(module, name, refuse)
    cfg = from_dict(
        TrainConfig,
        {
            "name": "no-driver-tokens",
            "flavour": "debug",
            "steps": 2,
            "seed": 1,
            "layout": {"ep": 2, "dp": 1},
            "optim": {"warmup_steps": 0},
            "data": {"path": str(data), "seq_len": 32, "global_batch_size": 4},
            "checkpoint": {"uri": str(tmp_path / "ckpt"), "every_steps": 2},
            "num_cpus_per_worker": 0.5,
            "storage_path": str(tmp_path / "ray"),
            "log_every": 1,
        },
    )
    # Execute
    result = run_training(cfg)
    # Assert: both steps ran on rows the workers read.
    assert result.error is None, result.error
    assert result.metrics["step"] == 2 and np.isfinite(result.metrics["loss"])
