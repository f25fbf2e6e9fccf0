"""Local processes the integration tests start: free loopback ports, and Ray clusters started with
`ray start` that the tests end by a marker in their environment (never `ray stop --force`, which
ends every Ray process on the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

MARKER_VAR = "RAYMOE_TEST_CLUSTER"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
