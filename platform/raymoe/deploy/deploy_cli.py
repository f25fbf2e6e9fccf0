"""`raymoe deploy apply|status|delete|logs`: the KubeRay manifests (k8s/) onto a cluster and back.

    raymoe deploy apply k8s/base [--wait] [--force-conflicts]   server-side apply, field manager "raymoe"
    raymoe deploy apply k8s/base/jobs/rayjob.ingest.yaml --wait   then each RayJob, one at a time
    raymoe deploy status k8s/base k8s/base/jobs                 readiness of each object from its status
    raymoe deploy delete k8s/base [--no-wait]                   reverse order, foreground, waits for gone
    raymoe deploy logs rayjob/raymoe-ingest [-f] [--tail N]     the Ray head pod's log

PATHS are read as kubectl reads them: a file is applied as given; a directory with a
kustomization.yaml (k8s/base) means the files its `resources:` lists, no others (so not jobs/); a
kustomize overlay (k8s/overlays/*: patches, or a base directory among its resources) is refused,
since only `kubectl apply --server-side -k` renders it; any other directory means every *.yaml
below it, and is refused if a kustomization lies below it. Deleting k8s/base deletes its Namespace
last, and with it everything else in that namespace (RayJobs from jobs/ too).

The cluster comes from the kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config; --context) or,
inside a pod, the service account. Exit codes: 0 done; 1 server or workload problem (unreachable,
5xx, not ready in time, failed); 2 a fix on the user's side (manifest, RBAC, CRD, flags).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

PATHS_HELP = (
    "manifest files (applied as given), kustomize base directories (the files their "
    "`resources:` lists; overlays are refused) or other directories (every *.yaml below)"
)


def _scope(namespace: str) -> str:
    """`namespace NS`, or `cluster-scoped` for an object without a namespace (a Namespace)."""
    return f"namespace {namespace}" if namespace else "cluster-scoped"


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config; in a pod without one: the service account)",
    )
    common.add_argument("--context", help="kubeconfig context (default: its current context)")
    common.add_argument(
        "-n",
        "--namespace",
        help="namespace for objects that set none (default: the context's namespace, else `default`)",
    )
    return common


def _wait_options(p: argparse.ArgumentParser, timeout_s: float) -> None:
    p.add_argument(
        "--timeout",
        type=float,
        default=timeout_s,
        metavar="SECONDS",
        help=f"give up waiting after this long (default: {timeout_s:g})",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between status reads while waiting (default: 2)",
    )


def add_deploy_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="apply, inspect, delete and tail the KubeRay deployment",
        description="Apply the manifests in k8s/ (Namespace, RBAC, RayCluster, RayService, "
        "monitoring; then the RayJobs in k8s/base/jobs one at a time) to a Kubernetes "
        "cluster with server-side apply, report their readiness, delete them, and stream "
        "the Ray head pod's log. A directory with a kustomization.yaml means the files its "
        "`resources:` lists; kustomize overlays take `kubectl apply --server-side -k`.",
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    common = _common_options()

    apply_p = verbs.add_parser(
        "apply",
        parents=[common],
        help="server-side apply the manifests",
        description="Server-side applies every object (field manager `raymoe`) in "
        "order: the Namespace, RBAC and config first, Ray workloads last. Running it "
        "again changes nothing unless the manifests changed. Apply k8s/base first, "
        "then each RayJob file of k8s/base/jobs in pipeline order (ingest, train, "
        "finetune, federated, drift).",
    )
    apply_p.add_argument("paths", nargs="+", help=PATHS_HELP)
    apply_p.add_argument(
        "--force-conflicts",
        action="store_true",
        help="take over fields another field manager (kubectl, an operator) set",
    )
    apply_p.add_argument("--wait", action="store_true", help="then wait until every object is ready (RayJob: running)")
    _wait_options(apply_p, 900.0)
    apply_p.set_defaults(func=_run_apply)

    status_p = verbs.add_parser(
        "status",
        parents=[common],
        help="readiness of each object",
        description="Reads each object of the manifests and prints its kind/name, "
        "readiness and the status fields it comes from (RayCluster conditions "
        "and state, RayService conditions, RayJob deployment and job status).",
    )
    status_p.add_argument("paths", nargs="+", help=PATHS_HELP)
    status_p.set_defaults(func=_run_status)

    delete_p = verbs.add_parser(
        "delete",
        parents=[common],
        help="delete the objects, in reverse order",
        description="Deletes every object in reverse apply order with "
        "propagationPolicy=Foreground, then waits until all are gone. The Namespace "
        "goes last, and with it every other object in it (RayJobs created from "
        "k8s/base/jobs too).",
    )
    delete_p.add_argument("paths", nargs="+", help=PATHS_HELP)
    delete_p.add_argument("--no-wait", action="store_true", help="return once the deletes are accepted")
    _wait_options(delete_p, 300.0)
    delete_p.set_defaults(func=_run_delete)

    logs_p = verbs.add_parser(
        "logs",
        parents=[common],
        help="stream the Ray head pod's log",
        description="Prints the log of the head pod (labels ray.io/cluster=<cluster>, "
        "ray.io/node-type=head) of a RayCluster, or of the cluster a RayJob or "
        "RayService runs on.",
    )
    logs_p.add_argument("target", help="raycluster/NAME, rayjob/NAME or rayservice/NAME")
    logs_p.add_argument("-f", "--follow", action="store_true", help="keep streaming new lines")
    logs_p.add_argument("--tail", type=int, metavar="LINES", help="only the last LINES lines")
    logs_p.add_argument("-c", "--container", help="container (default: the Ray container, the pod's first)")
    logs_p.set_defaults(func=_run_logs)


# ---- verbs ----


def _session(args: argparse.Namespace, need_manifests: bool = True):
    from raymoe.deploy.kube_client import KubeClient, connect
    from raymoe.deploy.kube_manifests import load_manifests

    manifests = load_manifests(args.paths) if need_manifests else []
    conn = connect(args.kubeconfig, args.context)
    return manifests, conn, KubeClient(conn.api_client, conn.host)


def _errors_to_exit_code(run):
    """Runs a verb; a KubeError becomes `raymoe deploy VERB: message` on stderr and its exit code."""

    def wrapped(args: argparse.Namespace) -> int:
        from raymoe.deploy.kube_manifests import KubeError

        try:
            return run(args)
        except KubeError as exc:
            print(f"raymoe deploy {args.verb}: {exc}", file=sys.stderr)
            return exc.exit_code

    return wrapped


@_errors_to_exit_code
def _run_apply(args: argparse.Namespace) -> int:
    from raymoe.deploy.kube_client import FIELD_MANAGER
    from raymoe.deploy.kube_manifests import target_namespace
    from raymoe.deploy.kube_status import READY

    manifests, conn, client = _session(args)
    targets = [(m, target_namespace(m, args.namespace, conn.namespace)) for m in manifests]
    print(f"applying {len(targets)} objects to {conn.host} (field manager {FIELD_MANAGER})")
    for manifest, namespace in targets:
        outcome, obj = client.apply(manifest, namespace, force=args.force_conflicts)
        meta = obj.get("metadata", {})
        print(f"{manifest.ref} {outcome} ({_scope(namespace)}, resourceVersion {meta.get('resourceVersion')})")
    if not args.wait:
        return 0
    return _wait(client, targets, want=READY, timeout_s=args.timeout, interval_s=args.interval)


@_errors_to_exit_code
def _run_status(args: argparse.Namespace) -> int:
    from raymoe.deploy.kube_manifests import target_namespace
    from raymoe.deploy.kube_status import readiness

    manifests, conn, client = _session(args)
    rows = [("OBJECT", "NAMESPACE", "STATE", "DETAIL")]
    for manifest in manifests:
        namespace = target_namespace(manifest, args.namespace, conn.namespace)
        ready = readiness(client.read(manifest.kind, manifest.name, namespace))
        rows.append((manifest.ref, namespace or "-", ready.state, ready.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


@_errors_to_exit_code
def _run_delete(args: argparse.Namespace) -> int:
    from raymoe.deploy.kube_manifests import target_namespace
    from raymoe.deploy.kube_status import ABSENT

    manifests, conn, client = _session(args)
    targets = [(m, target_namespace(m, args.namespace, conn.namespace)) for m in reversed(manifests)]
    pending = []
    for manifest, namespace in targets:
        if client.delete(manifest.kind, manifest.name, namespace):
            print(f"{manifest.ref} deleting ({_scope(namespace)}, propagationPolicy Foreground)")
            pending.append((manifest, namespace))
        else:
            print(f"{manifest.ref} already gone ({_scope(namespace)})")
    if args.no_wait or not pending:
        return 0
    return _wait(client, pending, want=ABSENT, timeout_s=args.timeout, interval_s=args.interval)


@_errors_to_exit_code
def _run_logs(args: argparse.Namespace) -> int:
    from raymoe.deploy.kube_manifests import USER_ERROR, KubeError, kind_named

    kind_name, _, name = args.target.partition("/")
    if not name:
        raise KubeError(f"{args.target!r}: expected KIND/NAME, e.g. raycluster/raymoe", USER_ERROR)
    kind = kind_named(kind_name)
    _, conn, client = _session(args, need_manifests=False)
    namespace = args.namespace or conn.namespace
    pod = client.head_pod(client.cluster_of(kind, name, namespace), namespace)
    out = sys.stdout.buffer
    try:
        for chunk in client.stream_log(pod, follow=args.follow, tail_lines=args.tail, container=args.container):
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        return 130
    return 0


# ---- waiting ----


class _Progress:
    """Waiting progress on stderr: a tqdm bar on a terminal, otherwise one plain line each time the
    set of objects still waited for changes, and every HEARTBEAT_S seconds (readable in CI logs)."""

    HEARTBEAT_S = 30.0

    def __init__(self, total: int, what: str, stream: TextIO):
        self.total, self.what, self.stream = total, what, stream
        self._last: str | None = None
        self._last_s = 0.0
        self._bar = None
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit="obj", file=stream, dynamic_ncols=True)

    def update(self, done: int, waiting: list[str], elapsed_s: float) -> None:
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(waiting[0] if waiting else "", refresh=False)
            self._bar.refresh()
            return
        line = f"{done}/{self.total} {self.what}" + (f"; waiting for {'; '.join(waiting)}" if waiting else "")
        if line != self._last or elapsed_s - self._last_s >= self.HEARTBEAT_S:
            print(f"[{elapsed_s:5.0f}s] {line}", file=self.stream, flush=True)
            self._last, self._last_s = line, elapsed_s

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _wait(
    client: Any, targets: list, *, want: str, timeout_s: float, interval_s: float, stream: TextIO | None = None
) -> int:
    """Reads every (manifest, namespace) in `targets` each `interval_s` seconds until all are in
    state `want` (READY or ABSENT). Returns 0 then; 1 on timeout or when an object reaches a state
    that waiting cannot fix (failed, suspended)."""
    from raymoe.deploy.kube_status import READY, TERMINAL_NOT_READY, readiness

    stream = stream or sys.stderr
    what = "ready" if want == READY else "deleted"
    progress = _Progress(len(targets), what, stream)
    start = time.monotonic()
    try:
        while True:
            pending = []
            for manifest, namespace in targets:
                state = readiness(client.read(manifest.kind, manifest.name, namespace))
                if state.state != want:
                    pending.append((manifest, state))
            elapsed = time.monotonic() - start
            progress.update(
                len(targets) - len(pending), [f"{m.ref} ({r.state}: {r.detail})" for m, r in pending], elapsed
            )
            stuck = [(m, r) for m, r in pending if want == READY and r.state in TERMINAL_NOT_READY]
            if not pending or stuck or elapsed >= timeout_s:
                break
            time.sleep(max(0.0, min(interval_s, timeout_s - elapsed)))
    finally:
        progress.close()
    if not pending:
        print(f"all {len(targets)} objects {what} after {elapsed:.0f}s")
        return 0
    for manifest, state in stuck or pending:
        why = f"is {state.state}" if stuck else f"not {what} after {timeout_s:g}s"
        print(f"raymoe deploy: {manifest.ref} {why}: {state.detail}", file=sys.stderr)
    return 1
