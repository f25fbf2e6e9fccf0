"""Training entrypoint: expert-parallel (ep x dp) MoE training on Ray Train.

    python -m pipelines.train --config pipelines/configs/train.debug.yaml [key.sub=value ...]
    ray job submit --working-dir . -- python -m pipelines.train --config ... layout.ep=4

Locally this starts an embedded Ray cluster on 127.0.0.1; under `ray job submit` (RAY_ADDRESS set)
it joins the cluster. `data.path` is an ingest output (`python -m pipelines.ingest`). The config,
the layout, the data (manifest, rows, shard checksums) and, with `memory_per_worker_gb`, each
worker's share of the model are checked before any worker starts. Rerunning with the same
`checkpoint.uri` resumes from its newest valid checkpoint, at the same or another layout.
data.path, checkpoint.uri, storage_path and history_path resolve against the storage root
(`--storage-root`, RAYMOE_STORAGE_ROOT; raymoe.storage), so under `ray job submit` nothing lands
in Ray's temporary copy of the working directory.
"""

from __future__ import annotations

import os
import sys

from raymoe.config import exit_on_config_error, parse_job_args
from raymoe.console import Console, JobFailed
from raymoe.ray_runtime import init_ray
from raymoe.storage import print_wrote
from raymoe.train.config import TrainConfig, check_before_launch


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(
        TrainConfig, argv, prog="python -m pipelines.train", description=__doc__, check=check_before_launch
    )
    with exit_on_config_error():  # RAY_ADDRESS naming no reachable cluster
        init_ray()
    # Imported after the checks: a bad config fails without paying for Ray Train's import.
    from raymoe.train.loop import run_training

    try:
        with Console().stage("train", total=cfg.steps) as stage:
            result = run_training(cfg)
            if result.error is not None:
                raise JobFailed(f"training failed: {result.error}")
            metrics = result.metrics or {}
            stage.summary = (
                f"step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4f}, "
                f"ep={cfg.layout.ep} x dp={cfg.layout.dp}"
            )
    except JobFailed:
        return 1
    print_wrote("checkpoints", cfg.checkpoint.uri)
    if cfg.history_path and os.path.isfile(cfg.history_path):
        print_wrote("history", cfg.history_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
