"""Expert re-placement: measured expert load -> a new placement -> (optionally) applied live.

    python -m pipelines.rebalance --config pipelines/configs/rebalance.debug.yaml [key.sub=value ...]
    python -m pipelines.rebalance --config ... windows.dir=/data/traffic apply.enabled=true apply.app_name=raymoe
    ray job submit --working-dir . -- python -m pipelines.rebalance --config ... apply.enabled=true

Reads tokens routed per expert per MoE layer over a window (the serving app's traffic windows, a
Prometheus counter, or a recorded trace), computes one placement for all MoE layers
(migration-aware against the running one), writes `placement.json`, `placement.md` (before/after
table) and a line of `rebalance-history.jsonl` to output_dir, and with `apply.enabled` applies it
to every replica of a running Serve app, live (`raymoe.deploy.rebalance_job`). The drift job runs
this on router-load drift (`actions.rebalance`); `interval_s` > 0 runs it on a schedule.

Exit status: 0 done (or nothing to move), 2 a config error or load that cannot be used (nothing
written), 1 the apply failed (placement.json is written). output_dir, windows.dir, trace.path,
model_path and placement.current resolve against the storage root (`--storage-root`,
RAYMOE_STORAGE_ROOT; raymoe.storage); the job ends with `wrote placement: <absolute path>`.
"""

from __future__ import annotations

import logging
import sys

from raymoe.config import parse_job_args
from raymoe.console import Console, JobFailed
from raymoe.deploy.rebalance_config import RebalanceJobConfig


def main(argv: list[str] | None = None) -> int:
    from raymoe.deploy.rebalance_job import prepare, run

    cfg = parse_job_args(
        RebalanceJobConfig, argv, prog="python -m pipelines.rebalance", description=__doc__, check=prepare
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with Console().stage("rebalance", bar=False) as stage:
            status = run(cfg)
            if status != 0:
                raise JobFailed(f"exit status {status} (the reason is above)")
            stage.summary = f"placement for the measured load in {cfg.output_dir}"
    except JobFailed:
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
