"""`raymoe rebalance --config FILE [key.sub=value ...]`: the re-placement job from the CLI
(the same job as `python -m pipelines.rebalance`, `raymoe.deploy.rebalance_job`)."""

from __future__ import annotations

import argparse


def add_rebalance_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rebalance", help="re-place experts from measured load; optionally apply it live",
                       description="Reads tokens per expert per MoE layer (traffic windows, Prometheus or a "
                       "trace), computes one expert placement for the serving app (EPLB, migration-aware), "
                       "writes placement.json and a before/after table, and with apply.enabled=true applies "
                       "it to every replica of a running Serve app. Exit 0 done, 2 config or load error, "
                       "1 apply failed.")
    p.add_argument("--config", required=True, help="YAML file with a RebalanceJobConfig "
                   "(pipelines/configs/rebalance.debug.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. apply.enabled=true windows.latest=4")

    def run(args: argparse.Namespace) -> int:
        import logging

        from raymoe.config import load_config
        from raymoe.deploy.rebalance_config import RebalanceJobConfig
        from raymoe.deploy.rebalance_job import prepare
        from raymoe.deploy.rebalance_job import run as run_job

        # A ConfigError (a ValueError) reaches `raymoe`'s main, which prints it and exits 2.
        cfg = load_config(RebalanceJobConfig, args.config, args.overrides)
        prepare(cfg)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return run_job(cfg)

    p.set_defaults(func=run)
