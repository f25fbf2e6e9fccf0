"""Ingest entrypoint: raw text and code -> packed Parquet token shards + manifest.

    python -m pipelines.ingest --config pipelines/configs/ingest.debug.yaml [key.sub=value ...]

Locally this starts an embedded Ray cluster on 127.0.0.1; under `ray job submit` (RAY_ADDRESS set)
it joins the cluster. The config and every local input path are checked before Ray starts.
Rerunning with the same config resumes: finished work units are skipped. output_dir resolves
against the storage root (`--storage-root`, RAYMOE_STORAGE_ROOT; raymoe.storage); the sources are
read from the working directory.
"""

from __future__ import annotations

import os
import sys

from raymoe.config import exit_on_config_error, parse_job_args
from raymoe.console import Console
from raymoe.data.ingest import run_ingest
from raymoe.data.ingest_config import IngestConfig, check_before_launch
from raymoe.data.manifest import MANIFEST_NAME
from raymoe.ray_runtime import init_ray
from raymoe.storage import print_wrote


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(
        IngestConfig, argv, prog="python -m pipelines.ingest", description=__doc__, check=check_before_launch
    )
    with exit_on_config_error():  # RAY_ADDRESS naming no reachable cluster
        init_ray(num_cpus=cfg.execution.num_cpus)
    # Ingest draws a bar per phase (clean, dedup, tokenize) itself.
    with Console().stage("ingest", bar=False) as stage:
        manifest = run_ingest(cfg)
        stage.summary = (
            f"{len(manifest['shards'])} shards of {manifest['seq_len']}-token rows, "
            f"{manifest['counts']['quarantined_total']} records quarantined"
        )
    print_wrote("ingest output", cfg.output_dir)
    print_wrote("manifest", os.path.join(cfg.output_dir, MANIFEST_NAME))
    return 0


if __name__ == "__main__":
    sys.exit(main())
