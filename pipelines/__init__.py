"""The job entrypoints, installed with the `raymoe` package: `python -m pipelines.<name>` (or
`raymoe <name>`) with `--config FILE [key.sub=value ...]`, from any directory and under
`ray job submit`. The shipped run configs are in `CONFIG_DIR` (pipelines/configs/*.yaml).
"""

from pathlib import Path

# Every module here with `main(argv) -> int`, in the order a run goes through them.
NAMES = ("ingest", "train", "finetune", "federated", "serve", "drift", "rebalance", "demo")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
