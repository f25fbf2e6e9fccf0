"""Starting or joining Ray the same way from every pipeline.

Under `ray job submit` (or with RAY_ADDRESS set) the job joins that cluster. Otherwise an embedded
single-node cluster starts, bound to 127.0.0.1 with token authentication off: Ray 2.60 turns
authentication on by default for a plain `ray.init()`, after which `ray job submit` answers 401.
Set RAY_AUTH_MODE=token yourself to keep it on.
"""

from __future__ import annotations

import os

LOCAL_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


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
