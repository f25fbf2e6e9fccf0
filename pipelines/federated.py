"""Federated LoRA fine-tuning entrypoint: silos train locally, the server aggregates adapters.

    python -m pipelines.federated --config pipelines/configs/federated.debug.yaml [key.sub=value ...]
    ray job submit --working-dir . -- python -m pipelines.federated --config ... strategy.name=fedprox

Each silo is a Ray actor placed by its custom resource (`silo_<name>`) on the nodes that hold its
data; it returns adapter tensors and counts, never records. Locally (no RAY_ADDRESS) every silo's
resource is given to the one embedded node, which simulates the silos on this machine. Rerunning
with the same output_dir resumes after the last finished round. base, debug_base and output_dir
resolve against the storage root (`--storage-root`, RAYMOE_STORAGE_ROOT; raymoe.storage); silo
data and eval_path are read from the working directory (each silo's, on its node).
"""

from __future__ import annotations

import os
import sys

from raymoe.config import exit_on_config_error, parse_job_args
from raymoe.console import Console, JobFailed
from raymoe.federated.config import FederatedConfig
from raymoe.federated.job import check_before_launch
from raymoe.ray_runtime import init_ray
from raymoe.storage import print_wrote


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(
        FederatedConfig, argv, prog="python -m pipelines.federated", description=__doc__, check=check_before_launch
    )
    with exit_on_config_error():  # RAY_ADDRESS naming no reachable cluster
        init_ray(resources={s.resource_name: 1 for s in cfg.silos})
    from raymoe.federated.job import run_federated
    from raymoe.federated.server import FederatedJobFailed

    try:
        with Console().stage("federated", total=cfg.rounds, unit="round") as stage:
            try:
                summary = run_federated(cfg)
            except FederatedJobFailed as exc:
                raise JobFailed(f"federated job stopped: {exc}") from exc
            stage.summary = f"{summary['rounds']} rounds over {len(cfg.silos)} silos"
    except JobFailed:
        return 1
    print_wrote("adapter", summary["adapter"])
    print_wrote("metrics", os.path.join(cfg.output_dir, "metrics.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
