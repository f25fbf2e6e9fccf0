"""The Kubernetes calls behind `raymoe deploy`: load manifests, server-side apply, read, delete
(foreground) and the head pod's log, with API errors turned into one-line messages.

Which client API does what, and why:
- KubeRay (ray.io/v1) and Prometheus Operator (monitoring.coreos.com/v1) kinds go through
  `CustomObjectsApi`: it is the client's API for CRD-backed kinds, needs no discovery, and a kind
  whose CRD is missing answers 404 on its own resource path, which is how "not installed" is told.
- Built-in kinds (ServiceAccount, Role, ...) go through their typed APIs (`CoreV1Api`, ...). Their
  patch methods list `application/apply-patch+yaml` among the content types they send, so
  server-side apply is a supported call there; the dynamic client would also work but costs
  discovery round trips (and a cache file) for kinds known when the manifests are rendered.
- Every apply is a PATCH with content type `application/apply-patch+yaml` (the body is JSON,
  which is YAML), `fieldManager=raymoe` and `force=true` only when asked (`--force-conflicts`).
  Responses are read raw (`_preload_content=False`) so every kind comes back as the same plain
  dict the API server sent.

Which files a path means: `raymoe.deploy.kube_manifests`.

References: https://kubernetes.io/docs/reference/using-api/server-side-apply/, the API
conventions' Status object (kind Status, reason, details.causes[].field, code) and
https://kubectl.docs.kubernetes.io/references/kustomize/kustomization/ (the kustomization fields).

Exit codes carried by `KubeError`: USER_ERROR (2) when the fix is in what the user runs or installs
(manifests, RBAC, CRDs, flags, kubeconfig); SERVER_ERROR (1) when the server is unreachable or
fails, or the workload does.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3

from raymoe.deploy.kube_manifests import (
    SA_NAMESPACE_FILE,
    SERVER_ERROR,
    USER_ERROR,
    Kind,
    KubeError,
    Manifest,
    ObjectNotFound,
)

FIELD_MANAGER = "raymoe"
APPLY_PATCH = "application/apply-patch+yaml"
REQUEST_TIMEOUT_S = (5, 30)  # (connect, read): an unreachable server fails in seconds, not minutes


@dataclass(frozen=True)
class Connection:
    """A configured `kubernetes.client.ApiClient`, the API server URL and the default namespace."""

    api_client: Any
    host: str
    namespace: str


def connect(kubeconfig: str | None = None, context: str | None = None) -> Connection:
    """Loads the client configuration as the kubernetes client does: the kubeconfig (`kubeconfig`,
    else $KUBECONFIG, else ~/.kube/config) with `context` or its current context; inside a pod
    without a kubeconfig, the service account's in-cluster configuration.

    Raises:
        KubeError: no usable configuration (USER_ERROR).
    """
    from kubernetes import client, config

    cfg = client.Configuration()
    in_cluster = (
        kubeconfig is None
        and context is None
        and "KUBERNETES_SERVICE_HOST" in os.environ
        and not os.path.exists(os.path.expanduser(config.KUBE_CONFIG_DEFAULT_LOCATION))
    )
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=cfg)
            namespace = Path(SA_NAMESPACE_FILE).read_text().strip() if os.path.exists(SA_NAMESPACE_FILE) else ""
        else:
            config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=cfg, persist_config=False
            )
            contexts, current = config.list_kube_config_contexts(kubeconfig)
            chosen = next((c for c in contexts if c["name"] == context), current) if context else current
            namespace = (chosen or {}).get("context", {}).get("namespace", "")
    except (config.ConfigException, OSError) as exc:
        where = "in-cluster service account" if in_cluster else (kubeconfig or config.KUBE_CONFIG_DEFAULT_LOCATION)
        raise KubeError(
            f"cannot load the Kubernetes configuration ({where}): {exc}: pass --kubeconfig "
            f"and --context, or run in a pod with a service account",
            USER_ERROR,
        ) from exc
    return Connection(client.ApiClient(cfg), cfg.host, namespace or "default")


class KubeClient:
    """Read, server-side apply and delete manifests' objects, and read a Ray head pod's log.

    Every method raises `KubeError` with a message for the user; nothing else escapes for API,
    network or permission problems.
    """

    def __init__(self, api_client: Any, host: str):
        from kubernetes import client

        self._client = client
        self._api_client = api_client
        self._custom = client.CustomObjectsApi(api_client)
        self._typed: dict[str, Any] = {}
        self.host = host

    # ---- object calls ----

    def read(self, kind: Kind, name: str, namespace: str) -> dict[str, Any] | None:
        """The object as stored, or None when it does not exist."""
        try:
            return self._json(self._call(kind, "get", name, namespace))
        except ObjectNotFound:
            return None

    def apply(self, manifest: Manifest, namespace: str, *, force: bool = False) -> tuple[str, dict[str, Any]]:
        """Server-side applies `manifest` in `namespace` ("" for a cluster-scoped kind) as field
        manager "raymoe".

        Returns:
            ("created" | "configured" | "unchanged", the object after the apply); "unchanged" when
            the API server kept the resourceVersion (the apply changed nothing).
        """
        before = self.read(manifest.kind, manifest.name, namespace)
        body = copy.deepcopy(manifest.body)
        if manifest.kind.namespaced:
            body["metadata"]["namespace"] = namespace
        else:
            body["metadata"].pop("namespace", None)
        after = self._json(self._call(manifest.kind, "patch", manifest.name, namespace, body=body, force=force))
        if before is None:
            return "created", after
        same = before["metadata"].get("resourceVersion") == after["metadata"].get("resourceVersion")
        return ("unchanged" if same else "configured"), after

    def delete(self, kind: Kind, name: str, namespace: str) -> bool:
        """Deletes with propagationPolicy=Foreground (the object stays, with a deletionTimestamp,
        until its dependents are gone). Returns False when it did not exist."""
        try:
            self._call(kind, "delete", name, namespace)
        except ObjectNotFound:
            return False
        return True

    # ---- logs ----

    def head_pod(self, cluster: str, namespace: str) -> dict[str, Any]:
        """The head pod of RayCluster `cluster` (labels ray.io/cluster, ray.io/node-type=head);
        the newest one when a restart left two."""
        selector = f"ray.io/cluster={cluster},ray.io/node-type=head"
        core = self._api("CoreV1Api")
        listing = self._send(
            "list",
            "pods",
            f"pods -l {selector}",
            namespace,
            lambda: core.list_namespaced_pod(
                namespace, label_selector=selector, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S
            ),
        )
        pods = self._json(listing)
        items = pods.get("items") or []
        if not items:
            raise KubeError(
                f"RayCluster/{cluster}: no head pod in namespace {namespace} (labels {selector}): "
                "check `raymoe deploy status`; the operator creates it once the cluster is applied",
                SERVER_ERROR,
            )
        return max(items, key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def stream_log(
        self, pod: dict[str, Any], *, follow: bool, tail_lines: int | None = None, container: str | None = None
    ) -> Iterator[bytes]:
        """Yields the log of the pod's Ray container (the first one, as KubeRay requires) in chunks
        as the API server sends them; with `follow`, until the container stops."""
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        container = container or pod["spec"]["containers"][0]["name"]
        core = self._api("CoreV1Api")
        kwargs: dict[str, Any] = {"container": container, "follow": follow, "_preload_content": False}
        if tail_lines is not None:
            kwargs["tail_lines"] = tail_lines
        if not follow:  # a followed log may stay quiet for longer than any read timeout
            kwargs["_request_timeout"] = REQUEST_TIMEOUT_S
        response = self._send(
            "get", "pods/log", f"Pod/{name}", namespace, lambda: core.read_namespaced_pod_log(name, namespace, **kwargs)
        )
        try:
            yield from response.stream(4096, decode_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise unreachable(self.host, exc) from exc
        finally:
            response.release_conn()

    def cluster_of(self, kind: Kind, name: str, namespace: str) -> str:
        """The RayCluster behind a RayCluster (itself), RayJob (status.rayClusterName) or
        RayService (status.activeServiceStatus.rayClusterName, else the pending one)."""
        if kind.kind == "RayCluster":
            return name
        if kind.kind not in ("RayJob", "RayService"):
            raise KubeError(f"{kind.kind}/{name}: logs come from a RayCluster, RayJob or RayService", USER_ERROR)
        obj = self.read(kind, name, namespace)
        if obj is None:
            raise KubeError(f"{kind.kind}/{name} not found in namespace {namespace}", USER_ERROR)
        status = obj.get("status") or {}
        cluster = (
            status.get("rayClusterName")
            or (status.get("activeServiceStatus") or {}).get("rayClusterName")
            or (status.get("pendingServiceStatus") or {}).get("rayClusterName")
        )
        if not cluster:
            raise KubeError(f"{kind.kind}/{name} has no RayCluster yet: check `raymoe deploy status`", SERVER_ERROR)
        return cluster

    # ---- plumbing ----

    def _api(self, cls: str) -> Any:
        if cls not in self._typed:
            self._typed[cls] = getattr(self._client, cls)(self._api_client)
        return self._typed[cls]

    def _call(
        self, kind: Kind, verb: str, name: str, namespace: str, *, body: dict | None = None, force: bool = False
    ) -> Any:
        """One get/patch/delete of `kind` `name` through CustomObjectsApi or the typed API
        (`namespace` is ignored for a cluster-scoped kind)."""
        opts: dict[str, Any] = {"_preload_content": False, "_request_timeout": REQUEST_TIMEOUT_S}
        if verb == "patch":
            opts.update(field_manager=FIELD_MANAGER, _content_type=APPLY_PATCH)
            if force:
                opts["force"] = True
        elif verb == "delete":
            opts["propagation_policy"] = "Foreground"
        if kind.typed is None:  # get_/patch_/delete_{namespaced,cluster}_custom_object
            scope = "namespaced" if kind.namespaced else "cluster"
            call = getattr(self._custom, f"{verb}_{scope}_custom_object")
            args: tuple = (kind.group, kind.version, *([namespace] if kind.namespaced else []), kind.plural, name)
        else:  # read_/patch_/delete_<stem>
            cls, stem = kind.typed
            call = getattr(self._api(cls), f"{'read' if verb == 'get' else verb}_{stem}")
            args = (name, namespace) if kind.namespaced else (name,)
        if body is not None:
            args += (body,)
        return self._send(verb, kind.resource, f"{kind.kind}/{name}", namespace, lambda: call(*args, **opts), kind=kind)

    def _send(self, verb: str, resource: str, ref: str, namespace: str, fn, *, kind: Kind | None = None) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn()
        except ApiException as exc:
            if not exc.status:  # no HTTP answer: the client reports TLS failures this way
                raise KubeError(
                    f"cannot talk to the Kubernetes API server at {self.host}: {exc.reason}: check "
                    "the kubeconfig's server URL and certificate-authority",
                    SERVER_ERROR,
                ) from exc
            raise explain_api_error(
                exc.status,
                exc.body,
                verb=verb,
                resource=resource,
                ref=ref,
                namespace=namespace,
                kind=kind,
                host=self.host,
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise unreachable(self.host, exc) from exc

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        return json.loads(response.data)


def unreachable(host: str, exc: BaseException) -> KubeError:
    """The message for a request that got no HTTP answer (refused, timed out, DNS, TLS)."""
    reason: BaseException = getattr(exc, "reason", None) or exc
    chain = [reason, reason.__context__, reason.__cause__]
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "refused" in str(reason).lower():
        why = "connection refused"
    elif isinstance(reason, (urllib3.exceptions.TimeoutError, TimeoutError)):
        why = "timed out"
    else:
        why = str(reason)
    return KubeError(
        f"cannot reach the Kubernetes API server at {host} ({why}): check --context, the "
        "kubeconfig's server URL and the network path to it",
        SERVER_ERROR,
    )


_FORBIDDEN = re.compile(r'User "(?P<user>[^"]+)" cannot (?P<verb>[\w]+) resource "(?P<resource>[^"]+)"')


def explain_api_error(
    code: int,
    body: str | bytes | None,
    *,
    verb: str,
    resource: str,
    ref: str,
    namespace: str,
    kind: Kind | None = None,
    host: str = "",
) -> KubeError:
    """A one-line `KubeError` for an API error answer: `code` and the body, a metav1.Status when the
    server sent one (reason, message, details.{name,kind,causes[].field,message}).

    A 404 whose Status names the object is `ObjectNotFound`; one that names no object (or a plain
    "404 page not found" from older servers) is a path nothing serves: for a CRD-backed kind, the
    CRD is not installed. `namespace` is "" for a cluster-scoped object.
    """
    status: dict[str, Any] = {}
    if body:
        try:
            parsed = json.loads(body)
            status = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            pass  # e.g. older API servers' plain-text "404 page not found"
    message = status.get("message") or (body.decode() if isinstance(body, bytes) else body or "").strip()
    details = status.get("details") or {}
    causes = details.get("causes") or []
    user_error = 400 <= code < 500
    where = f"in namespace {namespace}" if namespace else "at the cluster scope"

    if code == 404:
        if details.get("kind") == "namespaces" and resource != "namespaces":
            return KubeError(
                f"{ref}: namespace {details.get('name', namespace)} not found: create it or pass --namespace",
                USER_ERROR,
            )
        if details.get("name"):
            return ObjectNotFound(f"{ref} not found" + (f" in namespace {namespace}" if namespace else ""), USER_ERROR)
        if kind is not None and kind.install:
            return KubeError(f"{ref}: {kind.install.format(resource=kind.resource)}", USER_ERROR)
        return KubeError(
            f"{ref}: the API server does not serve {resource} (404 on its path): check that "
            "the cluster's Kubernetes version has it",
            USER_ERROR,
        )
    if code == 401:
        return KubeError(
            f"the API server at {host} rejected the credentials (401 Unauthorized): refresh the "
            "kubeconfig's token or pick another --context",
            USER_ERROR,
        )
    if code == 403:
        match = _FORBIDDEN.search(message)
        who, what = "this user", verb
        if match:
            user = match["user"]
            sa = user.split(":")
            who = (
                f"service account {sa[3]}"
                if user.startswith("system:serviceaccount:") and len(sa) == 4
                else f"user {user}"
            )
            what = match["verb"]
        plural = resource.partition(".")[0]
        # k8s/ grants namespaced Roles only; the cluster scope takes a ClusterRole from an admin.
        fix = "check the Role in k8s/" if namespace else "ask a cluster admin for a ClusterRole that allows it"
        return KubeError(f"{ref}: {who} cannot {what} {plural} {where}: {fix}", USER_ERROR)
    if code == 409:
        fields = ", ".join(c.get("field", "?") for c in causes) or "some fields"
        return KubeError(
            f"{ref}: apply conflicts with another field manager on {fields} ({message}): "
            "pass --force-conflicts to take those fields over",
            USER_ERROR,
        )
    if code == 422 or status.get("reason") == "Invalid":
        found = "; ".join(f"{c.get('field', '?')}: {c.get('message', '')}" for c in causes) or message
        return KubeError(f"{ref} rejected by the API server: {found}: fix the manifest", USER_ERROR)
    reason = status.get("reason") or ("client error" if user_error else "server error")
    return KubeError(
        f"{ref}: {verb} failed with {code} {reason}: {message or 'no message'}",
        USER_ERROR if user_error else SERVER_ERROR,
    )
