"""`raymoe manifests render [--out DIR] [--values FILE] [--model FLAVOUR --fleet FLEET | --plan FILE] [--check]`."""

from __future__ import annotations

import argparse
import sys


def add_manifests_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "manifests",
        help="render the KubeRay manifests (k8s/)",
        description="KubeRay manifests (RayCluster, RayJobs, RayService, monitoring, RBAC, "
        "NetworkPolicies, kustomize overlays) rendered from one set of deploy values.",
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    render_p = verbs.add_parser(
        "render",
        help="write the manifests (or check that they are current)",
        description="Renders every file under DIR from DeployValues: the defaults, a YAML file of "
        "DeployValues fields (--values), and the capacity planner's serving layout for a model on a "
        "fleet (--model/--fleet, or a saved `raymoe plan --json` file with --plan).",
    )
    render_p.add_argument("--out", default="k8s", help="output directory (default: k8s)")
    render_p.add_argument("--values", help="YAML file of DeployValues fields (see docs/kubernetes.md)")
    render_p.add_argument("--model", help="model flavour for the capacity planner, e.g. deepseek-v3")
    render_p.add_argument("--fleet", help="fleet for the capacity planner: h100-80g, h800, h200 or a YAML file")
    render_p.add_argument("--plan", help="a plan written by `raymoe plan --json FILE` (instead of --model/--fleet)")
    render_p.add_argument(
        "--no-overlays",
        action="store_true",
        help="render base/ only (implied by --model/--fleet and --plan: a planned "
        "layout is not reshaped by the cpu-dev/gpu-prod presets)",
    )
    render_p.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 and list the files that differ from the render"
    )

    def run_render(args: argparse.Namespace) -> int:
        from raymoe.config import ConfigError, from_dict
        from raymoe.deploy.manifests.planner_values import load_plan, plan_for, values_from_plan
        from raymoe.deploy.manifests.render import render_manifests, stale_files, write_manifests
        from raymoe.deploy.manifests.values import DeployValues

        try:
            if bool(args.model) != bool(args.fleet):
                raise ConfigError("--model and --fleet go together")
            if args.plan and args.model:
                raise ConfigError("give either --plan or --model/--fleet")
            values = DeployValues()
            if args.values:
                import yaml

                with open(args.values) as fh:
                    values = from_dict(DeployValues, yaml.safe_load(fh) or {})
            if args.model or args.plan:
                values = values_from_plan(
                    load_plan(args.plan) if args.plan else plan_for(args.model, args.fleet), values
                )
            planned = bool(args.model or args.plan)
            files = render_manifests(values, overlays=not (planned or args.no_overlays))
        except ConfigError as exc:
            print(f"raymoe manifests render: {exc}", file=sys.stderr)
            return 2
        if args.check:
            stale = stale_files(files, args.out)
            for path in stale:
                print(f"stale: {args.out}/{path}")
            print(
                f"{len(files) - len(stale)} of {len(files)} files current"
                if stale
                else f"all {len(files)} files in {args.out} are current"
            )
            return 1 if stale else 0
        write_manifests(files, args.out)
        print(f"wrote {len(files)} files to {args.out}")
        return 0

    render_p.set_defaults(func=run_render)
