"""Local processes the integration tests start: free loopback ports, and Ray clusters started with
`ray start` that the tests end by a marker in their environment (never `ray stop --force`, which
ends every Ray process on the machine)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from pathlib import Path

MARKER_VAR = "RAYMOE_TEST_CLUSTER"


# Ports handed out for servers the tests start later (a Serve proxy, a dashboard): below the
# kernel's ephemeral range (32768-60999 by default), from which every outgoing connection and
# every `bind(0)` of the other test worker's Ray processes draws, and above Ray's worker ports
# (10002-19999). A port from bind(0) is itself ephemeral, so between this check and the server's
# bind another process could take it ("Failed to bind to address" under `make test -n 2`).
TEST_PORTS = range(20000, 32000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the ephemeral range."""
    for port in random.sample(TEST_PORTS, 64):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {TEST_PORTS} after 64 tries")


@contextlib.contextmanager
def own_agent_port():
    """Inside it, `ray.init(address="local")` gives the new cluster's dashboard agent a free port.

    `ray.init` has no argument for that port (`ray start --dashboard-agent-listen-port` has), so
    every local cluster asks for Ray's fixed 52365. Under `make test` two test modules run at once,
    each may start one, and only the first agent can listen there; the other cluster's Jobs API then
    answers "No available agent to submit job" (measured). `ray.init` builds its `RayParams` by
    keyword through the module attribute, so a subclass put there for the call supplies the port.
    """
    from ray._private import parameter

    original = parameter.RayParams

    class RayParamsWithFreeAgentPort(original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("dashboard_agent_listen_port", free_port())
            super().__init__(*args, **kwargs)

    parameter.RayParams = RayParamsWithFreeAgentPort
    try:
        yield
    finally:
        parameter.RayParams = original


def marked_pids(marker: str) -> list[int]:
    """Processes (other than this one) whose environment has RAYMOE_TEST_CLUSTER=marker."""
    needle = f"{MARKER_VAR}={marker}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def stop_marked(marker: str, term_wait_s: float = 3.0, kill_wait_s: float = 10.0) -> None:
    """SIGTERM the marked processes, then SIGKILL what is left, waiting for each round to end."""
    for sig, wait_s in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, kill_wait_s)):
        for pid in marked_pids(marker):
            with contextlib.suppress(ProcessLookupError):  # ended since it was listed
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
