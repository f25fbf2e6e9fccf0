"""LoRA fine-tuning entrypoint: supervised fine-tuning of an exported artifact on Ray Train.

    python -m pipelines.finetune --config pipelines/configs/finetune.debug.yaml [key.sub=value ...]
    ray job submit --working-dir . -- python -m pipelines.finetune --config ... base=/models/x

Records are JSONL chat (`messages`) or `prompt`/`completion`, rendered with the base artifact's
chat template, loss on the answer tokens only; bad records are quarantined with a reason. Writes
a peft-format adapter (`output_dir/adapter`), the before/after held-out table
(`output_dir/metrics.json`) and, with `merge=true`, a merged HF artifact (`output_dir/merged`).
"""

from __future__ import annotations

import os
import sys

from raymoe.config import ConfigError, parse_job_args
from raymoe.ray_runtime import init_ray
from raymoe.train.finetune_config import FinetuneConfig, check_before_launch


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(FinetuneConfig, argv, prog="python -m pipelines.finetune", description=__doc__,
                         check=check_before_launch)
    from raymoe.train.finetune import make_debug_base, prepare_data, run_finetune

    # Everything that reads only local files is checked before Ray starts: the debug base (when
    # asked for) is written first so the records and the adapter targets are checked against it.
    try:
        if cfg.make_debug_base and not os.path.isfile(os.path.join(cfg.base, "config.json")):
            make_debug_base(cfg)
            check_before_launch(cfg)
        data = prepare_data(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    init_ray()
    summary = run_finetune(cfg, data)
    print(f"done: adapter at {summary['adapter']}" + (f", merged artifact at {summary['merged']}"
                                                     if "merged" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
