"""A local stand-in for the Kubernetes API server (stdlib http.server on 127.0.0.1, in a thread)
that answers exactly the calls `raymoe deploy` makes, as the real one would:

    GET    /api/v1/namespaces/NS/PLURAL/NAME, /apis/GROUP/VERSION/namespaces/NS/PLURAL/NAME, and
           for the cluster-scoped Namespace kind /api/v1/namespaces/NAME
    PATCH  the same paths: server-side apply only (Content-Type application/apply-patch+yaml,
           ?fieldManager=..., optional ?force=true)
    DELETE the same paths with ?propagationPolicy=Foreground
    GET    /api/v1/namespaces/NS/pods?labelSelector=k=v,...   and   .../pods/NAME/log?container=...

No discovery endpoint is served: the client's CustomObjectsApi and typed APIs need none.

Namespaces are objects like the others (key ("namespaces", "", NAME)): the ones the server starts
with are stored as `kubectl create namespace` leaves them; a namespaced object can be applied only
while its Namespace exists; a deleted Namespace, once gone, takes every object in it along (the
namespace controller's work, done at once here).

Server-side apply, simplified: field ownership is tracked per top-level field (spec, data, rules,
metadata.labels, ...) instead of per leaf. An apply creates a missing object (201); otherwise it
sets the fields it names, removes those its manager owned alone and no longer names, answers 409
when it would change a field another manager owns (unless force=true, which takes the field
over), and bumps resourceVersion (and metadata.generation, for changes outside metadata) only when
something changed. Errors are metav1.Status bodies shaped like the API server's: 401, 403
(Forbidden, "User ... cannot VERB resource ..."), 404 (an object: details.name; a namespace:
details.kind=namespaces; a path no CRD serves: no details), 409 (causes[].field), 422 (Invalid,
causes[].field and message).

Anything else the client sends (another method, path, content type, field manager or query
parameter) is answered 400 and recorded in `violations`; the `kube` fixture fails the test if any
were recorded.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

# plural -> (group, version, kind, served only when its CRD is installed)
RESOURCES = {
    "namespaces": ("", "v1", "Namespace", False),
    "serviceaccounts": ("", "v1", "ServiceAccount", False),
    "configmaps": ("", "v1", "ConfigMap", False),
    "services": ("", "v1", "Service", False),
    "persistentvolumeclaims": ("", "v1", "PersistentVolumeClaim", False),
    "pods": ("", "v1", "Pod", False),
    "roles": ("rbac.authorization.k8s.io", "v1", "Role", False),
    "rolebindings": ("rbac.authorization.k8s.io", "v1", "RoleBinding", False),
    "networkpolicies": ("networking.k8s.io", "v1", "NetworkPolicy", False),
    "cronjobs": ("batch", "v1", "CronJob", False),
    "jobs": ("batch", "v1", "Job", False),
    "rayclusters": ("ray.io", "v1", "RayCluster", True),
    "rayjobs": ("ray.io", "v1", "RayJob", True),
    "rayservices": ("ray.io", "v1", "RayService", True),
    "podmonitors": ("monitoring.coreos.com", "v1", "PodMonitor", True),
    "servicemonitors": ("monitoring.coreos.com", "v1", "ServiceMonitor", True),
    "prometheusrules": ("monitoring.coreos.com", "v1", "PrometheusRule", True),
}
ALL_CRDS = frozenset(f"{p}.{g}" for p, (g, _, _, crd) in RESOURCES.items() if crd)
CLUSTER_SCOPED = frozenset({"namespaces"})
APPLY_PATCH = "application/apply-patch+yaml"
_PATH = re.compile(
    r"/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/namespaces/(?P<ns>[^/]+)"
    r"/(?P<plural>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?"
)
_CLUSTER_PATH = re.compile(
    r"/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"/(?P<plural>[^/]+)/(?P<name>[^/]+)"
)
_SKIP = ("apiVersion", "kind", "metadata", "status")  # not "fields" of the object's content


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    """A metav1.Status as the API server writes it for a failed request."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


class FakeKubeApi:
    """The fake API server. Arrange a test with `seed`, `forbid`, `reject`, `set_status`,
    `add_pod`; look at `objects`, `requests` and `violations` afterwards.

    Args:
        token: the bearer token a request must carry (else 401).
        user: who the token is, as 403 messages name it.
        namespaces: the namespaces that exist at the start (as Namespace objects in `objects`).
        crds: installed CRDs by name (`rayclusters.ray.io`); kinds of other CRDs answer 404.
        field_manager: the fieldManager every apply must use.
    """

    def __init__(
        self,
        *,
        token: str = "test-token",
        user: str = "system:serviceaccount:raymoe:raymoe-deployer",
        namespaces=("raymoe", "default"),
        crds=ALL_CRDS,
        field_manager: str = "raymoe",
    ):
        self.token, self.user, self.field_manager = token, user, field_manager
        self.crds = set(crds)
        # (plural, namespace, name) -> object; namespace "" for a cluster-scoped object
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, query)
        self.violations: list[str] = []
        self.forbidden: set[tuple[str, str]] = set()  # (verb, plural)
        self.invalid: dict[tuple[str, str], list[dict]] = {}  # (plural, name) -> Status causes
        self.logs: dict[tuple[str, str], str] = {}  # (namespace, pod) -> log text
        self.delete_after_gets = 1  # a deleted object is still read this many times (foreground)
        self._status_after: dict[tuple[str, str, str], list] = {}  # key -> [gets left, status]
        self._gone_after: dict[tuple[str, str, str], int] = {}
        self._rv = 1000
        self._lock = threading.Lock()
        for name in namespaces:
            self._store_new(
                "namespaces",
                "",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
                "kubectl-create",
                "Update",
            )
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in one write, without Nagle: otherwise every answer waits for
            # the client's delayed ACK (40 ms on Linux).
            wbufsize = -1
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def _serve(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake._lock:
                    code, ctype, body = fake.handle(self.command, self.path, self.headers, raw)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_DELETE = do_POST = do_PUT = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def namespaces(self) -> set[str]:
        """The namespaces that exist (terminating ones too)."""
        return {name for plural, _, name in self.objects if plural == "namespaces"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path, *, namespace: str = "raymoe", server: str | None = None) -> Path:
        """Writes a kubeconfig whose current context (`fake`) points at this server."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": server or self.url}}],
            "users": [{"name": "deployer", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "deployer", "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # ---- arranging a test ----

    def forbid(self, verb: str, plural: str) -> None:
        """RBAC denies `verb` (get, list, create, patch, delete) on `plural` to this server's user;
        an apply that would create the object needs both create and patch."""
        self.forbidden.add((verb, plural))

    def reject(self, plural: str, name: str, field: str, message: str) -> None:
        """Validation rejects applies of `name` with 422 naming `field`."""
        self.invalid.setdefault((plural, name), []).append(
            {"reason": "FieldValueInvalid", "message": message, "field": field}
        )

    def seed(self, plural: str, namespace: str, obj: dict, manager: str = "kubectl-client-side-apply") -> dict:
        """Stores `obj` as if `manager` had written it with an Update (owning its top-level fields)."""
        with self._lock:
            return self._store_new(plural, namespace, obj, manager, "Update")

    def set_status(self, plural: str, namespace: str, name: str, status: dict, *, after_gets: int = 0) -> None:
        """Sets the object's status now, or as an operator would after `after_gets` more GETs of it."""
        with self._lock:
            if after_gets:
                self._status_after[(plural, namespace, name)] = [after_gets, status]
            else:
                self._write_status((plural, namespace, name), status)

    def add_pod(self, namespace: str, name: str, labels: dict, containers=("ray-head",), log: str = "") -> None:
        with self._lock:
            self._store_new(
                "pods",
                namespace,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "labels": labels},
                    "spec": {"containers": [{"name": c} for c in containers]},
                    "status": {"phase": "Running"},
                },
                "kubelet",
                "Update",
            )
            self.logs[(namespace, name)] = log

    def calls(self, method: str | None = None) -> list[tuple[str, str, dict]]:
        return [r for r in self.requests if method is None or r[0] == method]

    # ---- serving ----

    def _violation(self, what: str):
        self.violations.append(what)
        return 400, "application/json", status_body(400, "BadRequest", f"fake API server: {what}")

    def handle(self, method: str, raw_path: str, headers, raw: bytes):
        url = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self.requests.append((method, url.path, query))
        scheme, _, token = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or token != self.token:
            return 401, "application/json", status_body(401, "Unauthorized", "Unauthorized")
        m = _PATH.fullmatch(url.path) or _CLUSTER_PATH.fullmatch(url.path)
        if m is None:
            return self._violation(f"{method} {url.path}: not a path raymoe deploy should call")
        group, version = ("", "v1") if m["core"] else (m["group"], m["version"])
        cluster_scoped = m.re is _CLUSTER_PATH
        plural, name = m["plural"], m["name"]
        ns, sub = ("", None) if cluster_scoped else (m["ns"], m["sub"])
        known = RESOURCES.get(plural)
        if (
            known is None
            or known[:2] != (group, version)
            or (known[3] and f"{plural}.{group}" not in self.crds)
            or cluster_scoped != (plural in CLUSTER_SCOPED)
        ):
            # What kube-apiserver's final not-found handler answers for a path nothing serves.
            return (
                404,
                "application/json",
                status_body(404, "NotFound", "the server could not find the requested resource"),
            )
        verb = {"GET": "get" if name else "list", "PATCH": "patch", "DELETE": "delete"}.get(method)
        if sub == "log" and plural == "pods" and method == "GET":
            verb, resource = "get", "pods/log"
        elif sub is not None or verb is None or (name is None and (method != "GET" or plural != "pods")):
            return self._violation(f"{method} {url.path}: not a call raymoe deploy should make")
        else:
            resource = plural
        if (verb, resource) in self.forbidden:
            return self._forbidden(verb, resource, group, plural, name, ns)
        if resource == "pods/log":
            return self._log(ns, name, query)
        if verb == "list":
            return self._list_pods(ns, query)
        key = (plural, ns, name)
        if method == "PATCH" and key not in self.objects and ("create", resource) in self.forbidden:
            # An apply that creates the object is also authorized as a create.
            return self._forbidden("create", resource, group, plural, name, ns)
        if method == "GET":
            return self._get(key, group, query)
        if method == "PATCH":
            return self._apply(key, group, version, known[2], headers, query, raw)
        return self._delete(key, group, query)

    def _forbidden(self, verb, resource, group, plural, name, ns):
        what = f"{plural}.{group}" if group else plural
        where = f'{what} "{name}" is forbidden' if name else f"{what} is forbidden"
        scope = f'in the namespace "{ns}"' if ns else "at the cluster scope"
        return (
            403,
            "application/json",
            status_body(
                403,
                "Forbidden",
                f'{where}: User "{self.user}" cannot {verb} resource "{resource}" in API group "{group}" {scope}',
                {"name": name or "", "group": group, "kind": plural},
            ),
        )

    def _not_found(self, key, group):
        plural, _, name = key
        what = f"{plural}.{group}" if group else plural
        return (
            404,
            "application/json",
            status_body(404, "NotFound", f'{what} "{name}" not found', {"name": name, "group": group, "kind": plural}),
        )

    def _unexpected_query(self, query: dict, allowed: set[str]):
        extra = set(query) - allowed
        return self._violation(f"unexpected query parameters {sorted(extra)}") if extra else None

    def _get(self, key, group, query):
        if bad := self._unexpected_query(query, set()):
            return bad
        obj = self.objects.get(key)
        if obj is not None and key in self._gone_after:
            self._gone_after[key] -= 1
            if self._gone_after[key] < 0:
                self._remove(key)
                obj = None
        if obj is None:
            return self._not_found(key, group)
        if key in self._status_after:
            self._status_after[key][0] -= 1
            if self._status_after[key][0] <= 0:
                self._write_status(key, self._status_after.pop(key)[1])
        return 200, "application/json", self.objects[key]

    def _apply(self, key, group, version, kind, headers, query, raw):
        plural, ns, name = key
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype != APPLY_PATCH:
            return self._violation(f"PATCH {plural}/{name} with Content-Type {ctype!r}, not {APPLY_PATCH}")
        if query.get("fieldManager") != self.field_manager:
            return self._violation(f"apply of {plural}/{name} with fieldManager {query.get('fieldManager')!r}")
        if query.get("force", "true") != "true":
            return self._violation(f"apply of {plural}/{name} with force={query['force']!r}")
        if bad := self._unexpected_query(query, {"fieldManager", "force"}):
            return bad
        try:
            body = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            return self._violation(f"apply body is not YAML: {exc}")
        api_version = f"{group}/{version}" if group else version
        meta = body.get("metadata") if isinstance(body, dict) else None
        if (
            not isinstance(meta, dict)
            or (body.get("apiVersion"), body.get("kind")) != (api_version, kind)
            or meta.get("name") != name
            or meta.get("namespace", ns) != ns
        ):
            return self._violation(f"apply body for {api_version} {kind} {ns}/{name} names another object")
        if ns and ns not in self.namespaces:
            return (
                404,
                "application/json",
                status_body(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"}),
            )
        if causes := self.invalid.get((plural, name)):
            what = f"{kind}.{group}" if group else kind
            listing = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
            return (
                422,
                "application/json",
                status_body(
                    422,
                    "Invalid",
                    f'{what} "{name}" is invalid: {listing}',
                    {"name": name, "group": group, "kind": kind, "causes": causes},
                ),
            )
        existing = self.objects.get(key)
        if existing is None:
            return 201, "application/json", self._store_new(plural, ns, body, self.field_manager, "Apply")
        return self._merge(existing, body, api_version, force=query.get("force") == "true")

    def _store_new(self, plural, ns, obj, manager, operation) -> dict:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        self._rv += 1
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(self._rv), generation=1, creationTimestamp=_now())
        if ns:
            meta["namespace"] = ns
        if plural == "namespaces":
            obj["status"] = {"phase": "Active"}
        meta["managedFields"] = [self._entry(manager, operation, obj.get("apiVersion"), _fields(obj))]
        self.objects[(plural, ns, meta["name"])] = obj
        return obj

    @staticmethod
    def _entry(manager, operation, api_version, fields) -> dict:
        return {
            "manager": manager,
            "operation": operation,
            "apiVersion": api_version,
            "time": _now(),
            "fieldsType": "FieldsV1",
            "fieldsV1": {f"f:{f}": {} for f in sorted(fields)},
        }

    def _merge(self, obj, body, api_version, *, force) -> tuple[int, str, dict]:
        owners: dict[str, list[str]] = {}
        for entry in obj["metadata"].get("managedFields", []):
            for f in entry["fieldsV1"]:
                owners.setdefault(f[2:], []).append(entry["manager"])
        applied = _fields(body)
        conflicts = [
            f
            for f in sorted(applied)
            if _value(obj, f) != _value(body, f) and any(m != self.field_manager for m in owners.get(f, []))
        ]
        if conflicts and not force:
            others = sorted({m for f in conflicts for m in owners[f] if m != self.field_manager})
            causes = [
                {"reason": "FieldManagerConflict", "message": f'conflict with "{others[0]}"', "field": f".{f}"}
                for f in conflicts
            ]
            return (
                409,
                "application/json",
                status_body(
                    409,
                    "Conflict",
                    f"Apply failed with {len(conflicts)} conflict(s): conflict with "
                    f'"{others[0]}": {", ".join("." + f for f in conflicts)}',
                    {"causes": causes},
                ),
            )
        mine_before = {f for f, ms in owners.items() if self.field_manager in ms}
        dropped = {f for f in mine_before - applied if owners[f] == [self.field_manager]}
        new = copy.deepcopy(obj)
        for f in applied:
            _set(new, f, copy.deepcopy(_value(body, f)))
        for f in dropped:
            _set(new, f, None)
        if (
            _content(new) != _content(obj)
            or new["metadata"].get("labels") != obj["metadata"].get("labels")
            or new["metadata"].get("annotations") != obj["metadata"].get("annotations")
        ):
            self._rv += 1
            new["metadata"]["resourceVersion"] = str(self._rv)
            if _content(new) != _content(obj):
                new["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
        entries = []
        for entry in obj["metadata"].get("managedFields", []):
            kept = {f for f in (k[2:] for k in entry["fieldsV1"]) if not (force and f in conflicts)}
            if entry["manager"] != self.field_manager and kept:
                entries.append(
                    entry
                    if len(kept) == len(entry["fieldsV1"])
                    else {**entry, "fieldsV1": {f"f:{f}": {} for f in sorted(kept)}}
                )
        mine = next(
            (
                e
                for e in obj["metadata"].get("managedFields", [])
                if e["manager"] == self.field_manager and {k[2:] for k in e["fieldsV1"]} == applied
            ),
            None,
        )
        entries.append(mine or self._entry(self.field_manager, "Apply", api_version, applied))
        new["metadata"]["managedFields"] = entries
        self.objects[(_plural_of(new), new["metadata"].get("namespace", ""), new["metadata"]["name"])] = new
        return 200, "application/json", new

    def _write_status(self, key, status):
        obj = self.objects[key]
        obj["status"] = copy.deepcopy(status)
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def _delete(self, key, group, query):
        if query.get("propagationPolicy") != "Foreground":
            return self._violation(f"DELETE {key} with propagationPolicy={query.get('propagationPolicy')!r}")
        if bad := self._unexpected_query(query, {"propagationPolicy"}):
            return bad
        obj = self.objects.get(key)
        if obj is None:
            return self._not_found(key, group)
        if not obj["metadata"].get("deletionTimestamp"):
            self._rv += 1
            obj["metadata"].update(
                deletionTimestamp=_now(), finalizers=["foregroundDeletion"], resourceVersion=str(self._rv)
            )
            if key[0] == "namespaces":
                obj["status"] = {"phase": "Terminating"}
            self._gone_after[key] = self.delete_after_gets
        return 200, "application/json", obj

    def _remove(self, key) -> None:
        """Drops a deleted object for good; a Namespace takes every object in it along."""
        gone = [key] + ([k for k in self.objects if k[1] == key[2]] if key[0] == "namespaces" else [])
        for k in gone:
            self.objects.pop(k, None)
            self._gone_after.pop(k, None)
            self._status_after.pop(k, None)
            if k[0] == "pods":
                self.logs.pop((k[1], k[2]), None)

    def _list_pods(self, ns, query):
        if bad := self._unexpected_query(query, {"labelSelector"}):
            return bad
        if not query.get("labelSelector"):
            return self._violation("pods listed without a labelSelector")
        want = dict(term.split("=", 1) for term in query["labelSelector"].split(","))
        items = [
            o
            for (p, n, _), o in sorted(self.objects.items())
            if p == "pods" and n == ns and all(o["metadata"].get("labels", {}).get(k) == v for k, v in want.items())
        ]
        return (
            200,
            "application/json",
            {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)}, "items": items},
        )

    def _log(self, ns, name, query):
        if bad := self._unexpected_query(query, {"container", "follow", "tailLines"}):
            return bad
        pod = self.objects.get(("pods", ns, name))
        if pod is None:
            return self._not_found(("pods", ns, name), "")
        if query.get("container") not in [c["name"] for c in pod["spec"]["containers"]]:
            return self._violation(f"log of pod {name} for container {query.get('container')!r}")
        lines = self.logs.get((ns, name), "").splitlines(keepends=True)
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"]) :]
        return 200, "text/plain", "".join(lines).encode()


def _fields(obj: dict) -> set[str]:
    """Top-level fields an apply of `obj` sets (metadata.labels/annotations count as fields)."""
    fields = {k for k in obj if k not in _SKIP}
    fields |= {f"metadata.{k}" for k in ("labels", "annotations") if obj.get("metadata", {}).get(k)}
    return fields


def _value(obj: dict, field: str):
    head, _, tail = field.partition(".")
    return obj.get(head, {}).get(tail) if tail else obj.get(head)


def _set(obj: dict, field: str, value) -> None:
    head, _, tail = field.partition(".")
    target, key = (obj.setdefault(head, {}), tail) if tail else (obj, head)
    if value is None:
        target.pop(key, None)
    else:
        target[key] = value


def _content(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in _SKIP}


def _plural_of(obj: dict) -> str:
    return next(
        p for p, (g, v, k, _) in RESOURCES.items() if k == obj["kind"] and (f"{g}/{v}" if g else v) == obj["apiVersion"]
    )
