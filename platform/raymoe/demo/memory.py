"""Peak resident memory of the whole demo: the driver and every process of its Ray session.

A daemon thread sums the RSS of the driver's process tree (an embedded Ray cluster's GCS, raylet,
dashboard and workers are all below the driver) and of the trees of the processes started for the
driver's Ray session (found by its session directory on their command line: the raylet and its
workers when the driver joined a cluster that `ray start` runs on this machine) every
`interval_s`, and keeps the largest sum. RSS counts a page shared by several processes once per
process, so the sum is an upper bound of the memory the demo held.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

GIB = 1024**3
# What `make demo` must stay under on the project's 2-core machines (the demo prints the peak).
PEAK_RSS_LIMIT_GIB = 8.0
# Seconds between searches for the Ray session's processes (a scan of every process).
ROOT_SCAN_S = 10.0


def ray_session_dir() -> str | None:
    """The session directory of the Ray cluster this process is connected to, if any."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray._private.worker import _global_node

        return _global_node.get_session_dir_path() if _global_node is not None else None
    except Exception:  # noqa: BLE001 - a private API: without it only the driver's tree is counted
        return None


class PeakRSS:
    """Samples the demo's total RSS in a daemon thread; `peak_bytes` is the largest sum seen."""

    def __init__(self, interval_s: float = 0.5):
        import psutil

        self.interval_s = interval_s
        self.peak_bytes = 0
        self.samples = 0
        self._driver = psutil.Process(os.getpid())
        self._roots: dict[int, object] = {}
        self._last_scan = -ROOT_SCAN_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raymoe-demo-rss", daemon=True)

    def start(self) -> PeakRSS:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stops sampling (after one last sample); returns the peak in bytes."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        return self.peak_bytes

    def _session_roots(self) -> list:
        """Processes started for the driver's Ray session, rescanned every ROOT_SCAN_S seconds."""
        import psutil

        now = time.monotonic()
        if now - self._last_scan >= ROOT_SCAN_S:
            self._last_scan = now
            session = ray_session_dir()
            if session:
                for proc in psutil.process_iter(["cmdline"]):
                    if any(session in arg for arg in proc.info["cmdline"] or ()):
                        self._roots.setdefault(proc.pid, proc)
        return list(self._roots.values())

    def sample(self) -> int:
        """One sum of RSS over the driver's tree and the session's trees; returns it in bytes."""
        import psutil

        seen: dict[int, Any] = {}  # pid -> psutil.Process (psutil has no type information)
        for root in [self._driver, *self._session_roots()]:
            try:
                seen.setdefault(root.pid, root)
                for child in root.children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.Error:
                self._roots.pop(root.pid, None)  # gone; found again by the next scan if it came back
        total = 0
        for proc in seen.values():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        self.samples += 1
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()
