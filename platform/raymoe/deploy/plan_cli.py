"""`raymoe plan --model FLAVOUR --fleet FLEET [--rps N --ttft-ms N --tpot-ms N] [key.sub=value ...]`."""

from __future__ import annotations

import argparse
import json


def add_plan_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="size a deployment: layout, memory per GPU, tokens/s, replicas",
        description="Capacity plan for a model flavour on a fleet: expert-parallel and "
        "attention tensor-parallel degrees, weight / KV-cache / activation memory per GPU, "
        "all-to-all bytes per token per layer, roofline prefill and decode tokens/s, and "
        "the replicas the request rate needs under the TTFT / TPOT targets. Prints a table; "
        "--json writes what `raymoe manifests render` reads. Other PlanConfig fields go as "
        "dotted overrides, e.g. input_len=4000 roofline.gemm_efficiency=0.6.",
    )
    p.add_argument(
        "--model", required=True, help="flavour: deepseek-v3, mixtral-8x7b, qwen3-30b-a3b, deepseek-v2-lite, ..."
    )
    p.add_argument(
        "--fleet",
        required=True,
        help="shipped fleet (h100-80g, h800, h200), cpu (this machine, "
        "measured now; plan with roofline.weight_dtype=fp32 and the measured rates, see "
        "docs/planner.md), or a fleet YAML file",
    )
    p.add_argument("--rps", type=float, help="requests per second to serve (default: size one replica)")
    p.add_argument("--ttft-ms", type=float, help="time-to-first-token target (default 2000)")
    p.add_argument("--tpot-ms", type=float, help="time-per-output-token target (default 50)")
    p.add_argument(
        "--json", metavar="FILE", help="also write the plan as JSON to FILE ('-': print JSON instead of the table)"
    )
    p.add_argument("overrides", nargs="*", help="PlanConfig overrides, e.g. ep=32 num_redundant_experts=32")

    def run(args: argparse.Namespace) -> int:
        from raymoe.atomic_io import atomic_write_json
        from raymoe.config import apply_overrides, from_dict
        from raymoe.deploy.planner import PlanConfig, format_table, plan

        data = {"model": args.model, "fleet": args.fleet}
        for key, value in (("rps", args.rps), ("ttft_ms", args.ttft_ms), ("tpot_ms", args.tpot_ms)):
            if value is not None:
                data[key] = value
        # A ConfigError or ValueError reaches `raymoe`'s main, which prints it and exits 2.
        result = plan(from_dict(PlanConfig, apply_overrides(data, args.overrides)))
        if args.json == "-":
            print(json.dumps(result.to_dict(), indent=2))
            return 0
        print(format_table([result]))
        if args.json:
            atomic_write_json(args.json, result.to_dict())
            print(f"wrote {args.json}")
        return 0

    p.set_defaults(func=run)
