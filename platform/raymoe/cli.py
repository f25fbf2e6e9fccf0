"""The `raymoe` command: small verbs over the library (the pipelines have their own entrypoints).

    raymoe export CHECKPOINT OUT      sharded training checkpoint -> Hugging Face artifact
    raymoe merge BASE ADAPTER OUT     fold a LoRA adapter into an artifact (W + alpha/r * B @ A)
    raymoe dashboards export DIR      Grafana dashboards (JSON) + provisioning files
    raymoe dashboards push --url URL  upload them to Grafana (token from GRAFANA_TOKEN)
    raymoe report RUN_DIR             PNG plots of a run directory (no Grafana needed)
    raymoe plan --model FLAVOUR --fleet FILE  capacity plan: layout, memory, tokens/s, replicas
    raymoe rebalance --config FILE            expert re-placement from measured load (live apply)
    raymoe manifests render [--out k8s]       KubeRay manifests from one set of values
    raymoe deploy apply|status|delete|logs   KubeRay objects through the Kubernetes API

Adding a verb (e.g. `plan`, `dashboards`, `manifests`): write `_add_<verb>(sub)` that registers a
subparser and sets `func` to a `run(args) -> int`, and append it to `COMMANDS`. Heavy imports go
inside `run` so `raymoe --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the HF-format artifact of a training checkpoint",
                       description="Copies a training checkpoint's tensors, shard by shard and one at "
                       "a time, into Hugging Face safetensors + config.json + tokenizer + a manifest "
                       "linking to the checkpoint and its data manifest.")
    p.add_argument("checkpoint", help="checkpoint root (newest valid step) or a step-* directory")
    p.add_argument("out", help="output directory")

    def run(args: argparse.Namespace) -> int:
        from raymoe.train.export import export_checkpoint

        manifest = export_checkpoint(args.checkpoint, args.out)
        ckpt = manifest["checkpoint"]
        print(f"exported step {ckpt['step']} ({manifest['architecture']}) to {args.out}")
        return 0

    p.set_defaults(func=run)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="write an artifact with a LoRA adapter folded into its weights",
                       description="Writes OUT: the HF-format artifact BASE with the peft-format "
                       "adapter ADAPTER folded in (W + alpha / r * B @ A, routed-expert adapters "
                       "included). The result loads and serves without any LoRA code.")
    p.add_argument("base", help="HF-format artifact directory (e.g. a `raymoe export` output)")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output directory (must differ from BASE)")

    def run(args: argparse.Namespace) -> int:
        from raymoe.models.lora_merge import merge_adapter

        merge_adapter(args.base, args.adapter, args.out)
        print(f"merged {args.adapter} into {args.base}: wrote {args.out}")
        return 0

    p.set_defaults(func=run)


def _add_dashboards(sub: argparse._SubParsersAction) -> None:
    from raymoe.monitor.dashboards.cli import add_dashboards_command

    add_dashboards_command(sub)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write PNG plots of a run directory (no Grafana needed)",
                       description="Plots what RUN_DIR holds: training loss, tokens/s and the "
                       "expert-load heatmap, a federated run's loss per round, a drift job's "
                       "scores over time and the served model's quality. Missing data is skipped "
                       "with a log line; nothing to plot is an error.")
    p.add_argument("run_dir", help="training run output_dir, federated output_dir, or drift job "
                   "output_dir")
    p.add_argument("--out", help="output directory (default: RUN_DIR/report)")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch of the PNGs")

    def run(args: argparse.Namespace) -> int:
        import logging

        from raymoe.monitor.run_report import write_run_report

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        for path in write_run_report(args.run_dir, args.out or os.path.join(args.run_dir, "report"),
                                     dpi=args.dpi):
            print(path)
        return 0

    p.set_defaults(func=run)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from raymoe.deploy.plan_cli import add_plan_command

    add_plan_command(sub)


def _add_rebalance(sub: argparse._SubParsersAction) -> None:
    from raymoe.deploy.rebalance_cli import add_rebalance_command

    add_rebalance_command(sub)


def _add_manifests(sub: argparse._SubParsersAction) -> None:
    from raymoe.deploy.manifests.cli import add_manifests_command

    add_manifests_command(sub)


def _add_deploy(sub: argparse._SubParsersAction) -> None:
    from raymoe.deploy.deploy_cli import add_deploy_command

    add_deploy_command(sub)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_export, _add_merge, _add_dashboards, _add_report, _add_plan, _add_rebalance, _add_manifests,
    _add_deploy]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raymoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"raymoe {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
