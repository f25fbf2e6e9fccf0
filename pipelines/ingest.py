"""Ingest entrypoint: raw text and code -> packed Parquet token shards + manifest.

    python -m pipelines.ingest --config pipelines/configs/ingest.debug.yaml [key.sub=value ...]

Locally this starts an embedded Ray cluster on 127.0.0.1; under `ray job submit` (RAY_ADDRESS set)
it joins the cluster. Rerunning with the same config resumes: finished work units are skipped.
"""

from __future__ import annotations

import sys

from raymoe.config import parse_job_args
from raymoe.data.ingest import IngestConfig, run_ingest
from raymoe.ray_runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(IngestConfig, argv, prog="python -m pipelines.ingest", description=__doc__)
    init_ray(num_cpus=cfg.execution.num_cpus)
    run_ingest(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
