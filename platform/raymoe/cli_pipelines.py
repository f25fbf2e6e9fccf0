"""`raymoe <pipeline> --config FILE [key.sub=value ...]`: the job entrypoints under one command.

`raymoe train ARGS` is `python -m pipelines.train ARGS`: the arguments reach `pipelines.train.main`
untouched (its own `--help`, exit codes and config errors), with one convenience: a `--config`
that names no file relative to the working directory but names a shipped config
(`train.debug.yaml` or `pipelines/configs/train.debug.yaml`) is read from the installed
`pipelines/configs/`. Paths inside a config stay relative to the working directory.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# verb -> (one line for `raymoe --help`, config class `module:Class` for `raymoe config show`).
PIPELINES: dict[str, tuple[str, str]] = {
    "ingest": ("raw text and code -> deduplicated, tokenized Parquet shards", "raymoe.data.ingest_config:IngestConfig"),
    "train": ("expert-parallel MoE pre-training on Ray Train", "raymoe.train.config:TrainConfig"),
    "finetune": ("LoRA fine-tuning of an artifact on chat records", "raymoe.train.finetune_config:FinetuneConfig"),
    "federated": ("federated LoRA fine-tuning over data silos", "raymoe.federated.config:FederatedConfig"),
    "serve": ("serve an artifact behind the OpenAI API on Ray Serve", "raymoe.serve.serve_config:ServeJobConfig"),
    "drift": (
        "watch served traffic and quality for drift; act on it",
        "raymoe.monitor.drift_job_config:DriftJobConfig",
    ),
    "rebalance": (
        "re-place experts from measured load (optionally live)",
        "raymoe.deploy.rebalance_config:RebalanceJobConfig",
    ),
    "demo": (
        "the main job end to end: ingest, train, export, finetune, federated, serve, load, drift, "
        "rebalance, report, dashboards",
        "pipelines.demo:DemoConfig",
    ),
}
DEMO_CONFIG = "pipelines/configs/demo.debug.yaml"


def config_class(pipeline: str) -> type:
    """The dataclass the pipeline's `--config` file is read into."""
    module, _, name = PIPELINES[pipeline][1].partition(":")
    return getattr(importlib.import_module(module), name)


def shipped_config(value: str) -> Path | None:
    """The installed copy of a shipped config named by `value` when `value` is not a file here.

    `value` names a shipped config when it is its bare file name (`train.debug.yaml`) or ends
    with `pipelines/configs/<file name>` (the repository-relative path the docs use).
    """
    from pipelines import CONFIG_DIR

    if not value or os.path.exists(value):
        return None
    candidate = CONFIG_DIR / Path(value).name
    if not candidate.is_file():
        return None
    if value == candidate.name or value.replace(os.sep, "/").endswith(f"pipelines/configs/{candidate.name}"):
        return candidate
    return None


def resolve_config_args(argv: list[str]) -> list[str]:
    """`argv` with each `--config` value that names a shipped config replaced by its path."""
    out = list(argv)
    end = out.index("--") if "--" in out else len(out)
    for i in range(end):
        arg = out[i]
        if arg == "--config" and i + 1 < end:
            index, value, prefix = i + 1, out[i + 1], ""
        elif arg.startswith("--config="):
            index, value, prefix = i, arg.split("=", 1)[1], "--config="
        else:
            continue
        found = shipped_config(value)
        if found is not None:
            print(f"raymoe: --config {value}: using the shipped {found}", file=sys.stderr)
            out[index] = prefix + str(found)
    return out


def run_pipeline(name: str, argv: list[str]) -> int:
    """Runs `pipelines.<name>.main(argv)`; its SystemExit (bad arguments, config errors) passes."""
    asks_help = any(a in ("-h", "--help") for a in argv)
    if name == "demo" and not asks_help and not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", DEMO_CONFIG, *argv]
    from raymoe.config import INVOKED_AS

    module = importlib.import_module(f"pipelines.{name}")
    token = INVOKED_AS.set(f"raymoe {name}")
    try:
        return module.main(resolve_config_args(argv))
    finally:
        INVOKED_AS.reset(token)


def add_pipeline_verbs(sub: argparse._SubParsersAction) -> None:
    """Lists the pipeline verbs in `raymoe --help`; `main` hands their argv over before parsing."""
    for name, (help_line, _) in PIPELINES.items():
        sub.add_parser(name, help=help_line, add_help=False)
