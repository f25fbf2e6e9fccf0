"""raymoe: train, fine-tune, serve and operate Mixture-of-Experts models on Ray.

The pipelines (ingest ... demo) take a YAML config and dotted overrides, the same arguments as
`python -m pipelines.<verb>`; the other verbs work on what they produce. `raymoe VERB --help`
explains a verb, `raymoe config show VERB` lists every key a pipeline's config takes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EPILOG = """\
examples:
  raymoe demo                                     # the whole path on a local Ray, minutes
  raymoe ingest --config ingest.debug.yaml
  raymoe train --config train.debug.yaml steps=50 layout.ep=2
  raymoe export runs/train-debug/checkpoints artifacts/debug
  raymoe inspect artifacts/debug                  # step, layout, loss, size, data lineage
  raymoe chat --model artifacts/debug             # or --url http://127.0.0.1:8000
  raymoe serve --config serve.debug.yaml app.model_path=artifacts/debug
  raymoe config show train                        # every key, its default and help
  raymoe plan --model deepseek-v3 --fleet h800 --rps 10

A --config that is no file here but names a shipped config (train.debug.yaml, or
pipelines/configs/train.debug.yaml from any directory) is read from the installed
pipelines/configs/. Paths inside a config are relative to the working directory.
"""


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the Hugging Face artifact of a training checkpoint",
        description="Copies a training checkpoint's tensors, shard by shard and one at "
        "a time, into Hugging Face safetensors + config.json + tokenizer + a manifest "
        "linking to the checkpoint and its data manifest (see `raymoe inspect`). "
        "The artifact is what serve, finetune, chat and transformers load.",
    )
    p.add_argument("checkpoint", help="checkpoint root (its newest valid step) or a step-* directory")
    p.add_argument("out", help="output directory")

    def run(args: argparse.Namespace) -> int:
        from raymoe.train.export import export_checkpoint

        manifest = export_checkpoint(args.checkpoint, args.out)
        ckpt = manifest["checkpoint"]
        print(f"exported step {ckpt['step']} ({manifest['architecture']}) to {args.out}")
        return 0

    p.set_defaults(func=run)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="fold a LoRA adapter into an artifact's weights",
        description="Writes OUT: the HF-format artifact BASE with the peft-format "
        "adapter ADAPTER folded in (W + alpha / r * B @ A, routed-expert adapters "
        "included). The result loads and serves without any LoRA code.",
    )
    p.add_argument("base", help="HF-format artifact directory (e.g. a `raymoe export` output)")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output directory (must differ from BASE)")

    def run(args: argparse.Namespace) -> int:
        from raymoe.models.lora_merge import merge_adapter

        merge_adapter(args.base, args.adapter, args.out)
        print(f"merged {args.adapter} into {args.base}: wrote {args.out}")
        return 0

    p.set_defaults(func=run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write PNG plots of a run directory (no Grafana needed)",
        description="Plots what RUN_DIR holds: training loss, tokens/s and the "
        "expert-load heatmap, a federated run's loss per round, a drift job's "
        "scores over time and the served model's quality. Missing data is skipped "
        "with a log line; nothing to plot is an error.",
    )
    p.add_argument("run_dir", help="training run output_dir, federated output_dir, or drift job output_dir")
    p.add_argument("--out", help="output directory (default: RUN_DIR/report)")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch of the PNGs")

    def run(args: argparse.Namespace) -> int:
        import logging

        from raymoe.monitor.run_report import write_run_report

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        for path in write_run_report(args.run_dir, args.out or os.path.join(args.run_dir, "report"), dpi=args.dpi):
            print(path)
        return 0

    p.set_defaults(func=run)


def _add_pipelines(sub: argparse._SubParsersAction) -> None:
    from raymoe.cli_pipelines import add_pipeline_verbs

    add_pipeline_verbs(sub)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    from raymoe.cli_inspect import add_inspect_command

    add_inspect_command(sub)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    from raymoe.cli_chat import add_chat_command

    add_chat_command(sub)


def _add_config(sub: argparse._SubParsersAction) -> None:
    from raymoe.cli_config_show import add_config_command

    add_config_command(sub)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from raymoe.deploy.plan_cli import add_plan_command

    add_plan_command(sub)


def _add_manifests(sub: argparse._SubParsersAction) -> None:
    from raymoe.deploy.manifests.cli import add_manifests_command

    add_manifests_command(sub)


def _add_deploy(sub: argparse._SubParsersAction) -> None:
    from raymoe.deploy.deploy_cli import add_deploy_command

    add_deploy_command(sub)


def _add_dashboards(sub: argparse._SubParsersAction) -> None:
    from raymoe.monitor.dashboards.cli import add_dashboards_command

    add_dashboards_command(sub)


# In the order `raymoe --help` lists them: pipelines, model files, deployment, monitoring.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_pipelines,
    _add_export,
    _add_merge,
    _add_inspect,
    _add_chat,
    _add_config,
    _add_plan,
    _add_manifests,
    _add_deploy,
    _add_dashboards,
    _add_report,
]


def version() -> str:
    """The installed package's version (`raymoe --version`)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("raymoe")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the verb list in two columns: argparse measures the verbs one indent short."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            self._action_max_length = max(
                self._action_max_length, max(map(len, action.choices)) + self._current_indent + 2
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description=__doc__, epilog=EPILOG, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"raymoe {version()}")
    sub = parser.add_subparsers(dest="command", required=True, title="verbs", metavar="VERB")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `raymoe` console script. Pipeline verbs hand their arguments to `pipelines.<verb>.main`."""
    from raymoe.cli_pipelines import PIPELINES, run_pipeline

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PIPELINES:
        return run_pipeline(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"raymoe {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`raymoe config show train | head`): no traceback, and none at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
