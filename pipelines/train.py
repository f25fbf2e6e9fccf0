"""Training entrypoint: expert-parallel (ep x dp) MoE training on Ray Train.

    python -m pipelines.train --config pipelines/configs/train.debug.yaml [key.sub=value ...]
    ray job submit --working-dir . -- python -m pipelines.train --config ... layout.ep=4

Locally this starts an embedded Ray cluster on 127.0.0.1; under `ray job submit` (RAY_ADDRESS set)
it joins the cluster. `data.path` is an ingest output (`python -m pipelines.ingest`). The config,
the layout, the data (manifest, rows, shard checksums) and, with `memory_per_worker_gb`, each
worker's share of the model are checked before any worker starts. Rerunning with the same
`checkpoint.uri` resumes from its newest valid checkpoint, at the same or another layout.
"""

from __future__ import annotations

import sys

from raymoe.config import parse_job_args
from raymoe.ray_runtime import init_ray
from raymoe.train.config import TrainConfig, check_before_launch


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(TrainConfig, argv, prog="python -m pipelines.train", description=__doc__,
                         check=check_before_launch)
    init_ray()
    # Imported after the checks: a bad config fails without paying for Ray Train's import.
    from raymoe.train.loop import run_training

    result = run_training(cfg)
    if result.error is not None:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    metrics = result.metrics or {}
    print(f"done: step {metrics.get('step')} loss {metrics.get('loss', float('nan')):.4f}; "
          f"checkpoints under {cfg.checkpoint.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
