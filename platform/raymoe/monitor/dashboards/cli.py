"""`raymoe dashboards export DIR` and `raymoe dashboards push --url URL [--folder TITLE]`."""

from __future__ import annotations

import argparse
import os
import re
import sys


def folder_uid_for(title: str) -> str:
    """The folder uid `push` uses for a folder title: lower-case letters, digits and dashes, at most
    40 characters (`raymoe` -> `raymoe`, `ML Platform` -> `ml-platform`)."""
    uid = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40].strip("-")
    if not uid:
        raise ValueError(f"--folder={title!r}: needs at least one letter or digit")
    return uid


def add_dashboards_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboards",
        help="write or upload the Grafana dashboards",
        description="The raymoe Grafana dashboards (training, serving, experts, drift, "
        "federated), generated from the metric registry.",
    )
    verbs = p.add_subparsers(dest="verb", required=True)

    export_p = verbs.add_parser(
        "export",
        help="write the dashboard JSON and Grafana provisioning files",
        description="Writes DIR/<name>.json per dashboard and "
        "DIR/provisioning/{dashboards,datasources}.yaml for Grafana file "
        "provisioning.",
    )
    export_p.add_argument("dir", help="output directory")

    def run_export(args: argparse.Namespace) -> int:
        from raymoe.monitor.dashboards.grafana_push import export

        paths = export(args.dir)
        print(f"wrote {len(paths)} files to {args.dir}")
        return 0

    export_p.set_defaults(func=run_export)

    push_p = verbs.add_parser(
        "push",
        help="upload the dashboards to a Grafana server",
        description="Creates the folder if missing, then creates or replaces "
        "each dashboard by uid (running it again updates, never duplicates). "
        "The token is read from GRAFANA_TOKEN (a service-account token with the "
        "Editor role).",
    )
    push_p.add_argument("--url", required=True, help="Grafana base URL, e.g. http://localhost:3000")
    push_p.add_argument(
        "--folder",
        default="raymoe",
        help="folder title (default: raymoe); its uid is the title in lower-case with dashes",
    )

    def run_push(args: argparse.Namespace) -> int:
        from raymoe.monitor.dashboards.grafana_push import GrafanaPushError, push

        try:
            results = push(args.url, os.environ.get("GRAFANA_TOKEN"), args.folder, folder_uid_for(args.folder))
        except GrafanaPushError as exc:
            print(f"raymoe dashboards push: {exc}", file=sys.stderr)
            return 1
        for result in results:
            print(f"{result['uid']}: version {result['version']} at {args.url.rstrip('/')}{result['url']}")
        return 0

    push_p.set_defaults(func=run_push)
