"""Ingest entrypoint: raw text and code -> packed Parquet token shards + manifest.

    python -m pipelines.ingest --config pipelines/configs/ingest.debug.yaml [key.sub=value ...]

Locally this starts an embedded Ray cluster on 127.0.0.1; under `ray job submit` (RAY_ADDRESS set)
it joins the cluster. Rerunning with the same config resumes: finished work units are skipped.
"""

from __future__ import annotations

import argparse
import sys

from raymoe.config import ConfigError, load_config
from raymoe.data.ingest import IngestConfig, run_ingest
from raymoe.ray_runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with an IngestConfig")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pack.seq_len=128")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(IngestConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    init_ray(num_cpus=cfg.execution.num_cpus)
    run_ingest(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
