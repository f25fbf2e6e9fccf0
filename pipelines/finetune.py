"""LoRA fine-tuning entrypoint: supervised fine-tuning of an exported artifact on Ray Train.

    python -m pipelines.finetune --config pipelines/configs/finetune.debug.yaml [key.sub=value ...]
    ray job submit --working-dir . -- python -m pipelines.finetune --config ... base=/models/x

Records are JSONL chat (`messages`) or `prompt`/`completion`, rendered with the base artifact's
chat template, loss on the answer tokens only; bad records are quarantined with a reason. Writes
a peft-format adapter (`output_dir/adapter`), the before/after held-out table
(`output_dir/metrics.json`) and, with `merge=true`, a merged HF artifact (`output_dir/merged`).
base, debug_base, output_dir and storage_path resolve against the storage root (`--storage-root`,
RAYMOE_STORAGE_ROOT; raymoe.storage); data.path and eval_path are read from the working directory.
"""

from __future__ import annotations

import os
import sys

from raymoe.config import exit_on_config_error, job_arg_parser, load_job_config
from raymoe.console import Console
from raymoe.ray_runtime import init_ray
from raymoe.storage import print_wrote
from raymoe.train.finetune_config import FinetuneConfig, check_before_launch


def main(argv: list[str] | None = None) -> int:
    args = job_arg_parser(FinetuneConfig, prog="python -m pipelines.finetune", description=__doc__).parse_args(argv)
    # Everything that reads only local files is checked before Ray starts. The debug base is
    # written (only at the config's own debug_base path) after the other checks passed, and the
    # records and the adapter targets are then checked against it.
    with exit_on_config_error(args.debug):
        cfg = load_job_config(FinetuneConfig, args)
        check_before_launch(cfg)
        from raymoe.train.finetune import make_debug_base, prepare_data, run_finetune, summary_line

        if cfg.writes_debug_base and not os.path.isfile(os.path.join(cfg.base, "config.json")):
            make_debug_base(cfg)
            print_wrote("debug base artifact", cfg.base)
            check_before_launch(cfg)
        data = prepare_data(cfg)
    with exit_on_config_error():  # RAY_ADDRESS naming no reachable cluster
        init_ray()
    with Console().stage("finetune", total=cfg.steps) as stage:
        summary = run_finetune(cfg, data)
        stage.summary = summary_line(cfg, data, summary)
    print_wrote("adapter", summary["adapter"])
    if "merged" in summary:
        print_wrote("merged artifact", summary["merged"])
    print_wrote("metrics", os.path.join(cfg.output_dir, "metrics.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
