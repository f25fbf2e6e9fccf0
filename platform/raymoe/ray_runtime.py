"""Starting or joining Ray the same way from every pipeline.

Under `ray job submit` (or with RAY_ADDRESS set) the job joins that cluster. Otherwise an embedded
single-node cluster starts, bound to 127.0.0.1 with token authentication off: Ray 2.60 turns
authentication on by default for a plain `ray.init()`, after which `ray job submit` answers 401.
Set RAY_AUTH_MODE=token yourself to keep it on.

A RAY_ADDRESS that no cluster answers at fails within seconds (`RayUnreachableError`), before
`ray.init`, which would retry a dead GCS for minutes.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from raymoe.config import ConfigError

# How long a named cluster has to accept a TCP connection.
REACH_TIMEOUT_S = 3.0

LOCAL_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


class RayUnreachableError(ConfigError):
    """RAY_ADDRESS names a Ray cluster that does not answer (or an address ray.init cannot use)."""


def _host_port(address: str, hostport: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets) split; a ConfigError naming RAY_ADDRESS otherwise."""
    try:
        parts = urlsplit(f"//{hostport}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise RayUnreachableError(
            f"RAY_ADDRESS={address!r}: expected host:port (the head's GCS, usually port 6379), "
            "ray://host:port (Ray Client, usually 10001), auto or local"
        )
    return host, port


def ray_target(address: str) -> tuple[str, int] | None:
    """The host and port that must answer for `ray.init(address=address)` to join a cluster;
    None when it starts one ("local").

    Raises:
        RayUnreachableError: an HTTP address (the dashboard / job API, not one ray.init joins),
            a malformed one, or "auto" with no cluster recorded on this machine.
    """
    if address == "local":
        return None
    if address.startswith(("http://", "https://")):
        raise RayUnreachableError(
            f"RAY_ADDRESS={address!r} is the dashboard / job API address (for `ray job submit`); "
            "ray.init joins the head's GCS (host:6379) or ray://host:10001; unset RAY_ADDRESS to start a local one"
        )
    if address.startswith("ray://"):
        return _host_port(address, address[len("ray://") :].split("/", 1)[0])
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        # What ray.init("auto") joins: the cluster the last `ray start` recorded in
        # /tmp/ray/ray_current_cluster, else a GCS process found running here.
        try:
            found = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            found = None
        if not found:
            raise RayUnreachableError(
                "RAY_ADDRESS='auto': no Ray cluster is recorded or running on this machine "
                "(start one with `ray start --head`); unset RAY_ADDRESS to start a local one"
            )
        return _host_port(address, found)
    return _host_port(address, address)


def check_reachable(address: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Fails fast unless something accepts a TCP connection where `address` points.

    Args:
        address: a RAY_ADDRESS value (host:port, ray://host:port, auto, local).
        timeout_s: seconds to wait for the connection.

    Raises:
        RayUnreachableError: nothing answers there within `timeout_s` (or the address is unusable).
    """
    target = ray_target(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            return
    except socket.gaierror as exc:
        why = f"cannot resolve host {target[0]!r}: {exc.strerror}"
    except ConnectionRefusedError:
        why = "connection refused"
    except TimeoutError:
        why = f"no answer within {timeout_s:g} s"
    except OSError as exc:
        why = exc.strerror or str(exc)
    shown = f" ({target[0]}:{target[1]})" if address == "auto" else ""
    raise RayUnreachableError(
        f"RAY_ADDRESS={address!r}{shown}: no Ray cluster answers there ({why}); unset RAY_ADDRESS to start a local one"
    )


def init_ray(num_cpus: int | None = None, resources: dict[str, float] | None = None) -> None:
    """Connects to RAY_ADDRESS if set, else starts a local cluster; no-op if Ray is up.

    Args:
        num_cpus: logical CPUs of the local cluster (default: all cores). Ignored when joining
            an existing cluster.
        resources: custom resources of the local node (e.g. `silo_<name>` for federated silos
            simulated on one machine). Ignored when joining an existing cluster.
    """
    import ray

    if ray.is_initialized():
        return
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        # "local": always a new embedded cluster; a plain ray.init() would join whatever cluster
        # an earlier `ray start` left its address for in /tmp/ray (or retry it, if it is dead).
        address="local",
        num_cpus=num_cpus,
        resources=resources,
        # The dashboard serves the State API Ray Train's controller watchdog polls (without it,
        # a warning every 2 s) and the job/metrics views; loopback only.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {k: os.environ[k] for k in LOCAL_ENV}},
    )
