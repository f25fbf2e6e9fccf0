"""A real Prometheus (Debian's `prometheus` binary) scraping the local test Ray cluster.

Not a test module: integration tests start one with `PrometheusServer(sd_file, workdir)`, ask it
PromQL through its HTTP API (`/api/v1/query`) and stop it. It listens on 127.0.0.1 on a free port,
keeps its TSDB under `workdir`, and finds Ray's metrics ports through the Prometheus file
service-discovery file that Ray's dashboard writes into the session directory
(`prom_metrics_service_discovery.json`, refreshed every 5 s; see `ray_service_discovery_file`).

References: Prometheus HTTP API (https://prometheus.io/docs/prometheus/latest/querying/api/),
file-based service discovery (https://prometheus.io/docs/guides/file-sd/).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.integration.local_processes import free_port as _free_port

PROMETHEUS = shutil.which("prometheus")
SKIP_REASON = "prometheus not found on PATH: `make test` installs it (apt-get install prometheus)"


def ray_service_discovery_file(timeout_s: float = 30.0) -> Path:
    """Ray's Prometheus service-discovery file of the session this process is connected to.

    Only a cluster started with its dashboard writes one (the dashboard's reporter module does, every
    5 s). The session's own file is used, not the `/tmp/ray` copy, which points at whichever
    session on the machine wrote last.

    Raises:
        TimeoutError: the file did not appear within `timeout_s` seconds.
    """
    import ray
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    if node is None:
        raise RuntimeError("Ray is not initialised in this process")
    session_dir = Path(node.get_session_dir_path())
    path = session_dir / ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{path} did not appear in {timeout_s:.0f} s; was Ray started with "
                "include_dashboard=True (the dashboard writes it)?"
            )
        time.sleep(0.5)
    return path


class PrometheusServer:
    """One Prometheus process: scrapes the targets in `sd_file` every `scrape_interval_s` seconds.

    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(self, sd_file: Path, workdir: Path, scrape_interval_s: float = 2.0):
        self.sd_file = Path(sd_file)
        self.workdir = Path(workdir)
        self.scrape_interval_s = scrape_interval_s
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 30.0) -> PrometheusServer:
        """Writes the config, starts the binary and waits for `/-/ready`.

        Raises:
            RuntimeError: the binary is missing, exited, or was not ready in `ready_timeout_s`.
        """
        if PROMETHEUS is None:
            raise RuntimeError(SKIP_REASON)
        self.workdir.mkdir(parents=True, exist_ok=True)
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        # The file SD list is re-read when the file changes; refresh_interval is the fallback poll.
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": "ray",
                    "file_sd_configs": [{"files": [str(self.sd_file)], "refresh_interval": "5s"}],
                    # Ray lists its metrics ports at the machine's network address; they listen on
                    # every interface, so scrape them over loopback (tests talk to 127.0.0.1 only).
                    # The instance label keeps Ray's address, as a cluster's Prometheus would see it.
                    "relabel_configs": [
                        {
                            "source_labels": ["__address__"],
                            "regex": "[^:]+:(\\d+)",
                            "target_label": "__address__",
                            "replacement": "127.0.0.1:$1",
                        }
                    ],
                }
            ],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.port = _free_port()
        with open(self.workdir / "prometheus.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1d",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus was not ready in {ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 4000) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-num_chars:] if path.exists() else ""

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
            body = json.load(exc)
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query at `at` (unix seconds; default now).

        Returns:
            The result's series: for a vector each `{"metric": {label: value}, "value": float}`
            (a scalar is one series with no labels); for a range selector such as `x[5m]` each
            `{"metric": ..., "values": [(unix seconds, float), ...]}`, the raw scraped samples.

        Raises:
            ValueError: Prometheus rejected the query (the message is Prometheus' own).
        """
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        data = self._get("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": float(data["result"][1])}]
        if data["resultType"] == "matrix":
            return [
                {"metric": s["metric"], "values": [(float(t), float(v)) for t, v in s["values"]]}
                for s in data["result"]
            ]
        return [{"metric": s["metric"], "value": float(s["value"][1])} for s in data["result"]]

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        """Values of `label` on the series `match` selects, or on any series (what Grafana's
        `label_values` variable query asks), over all stored time."""
        return self._get(f"/api/v1/label/{label}/values", {"match[]": match} if match else {})

    def targets(self) -> list[dict]:
        """Active scrape targets with their health (`up`, `down`, `unknown`) and last error."""
        return self._get("/api/v1/targets", {"state": "active"})["activeTargets"]

    def wait_for(
        self, expr: str, timeout_s: float = 90.0, check=lambda series: bool(series), poll_s: float = 1.0
    ) -> list[dict]:
        """Polls `query(expr)` until `check(series)` holds; returns those series.

        Raises:
            TimeoutError: naming the query and what it last returned.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            series = self.query(expr)
            if check(series):
                return series
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout_s:.0f} s, {expr!r} returned {series}")
            time.sleep(poll_s)

    def stop(self) -> None:
        """Terminates the process (SIGTERM, then SIGKILL after 10 s) and waits for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
