"""Nothing a job writes is lost under `ray job submit --working-dir .`: against a real local head
(`ray start --head` on 127.0.0.1), the ingestion and training debug jobs are submitted with the venv's
`ray` CLI, without PYTHONPATH (the `pipelines` and `raymoe` packages are installed), with
RAYMOE_STORAGE_ROOT in the job's runtime env; every `wrote <what>: <path>` line they print names an
existing absolute path under that root and outside Ray's temporary folder, and nothing was written
into Ray's unpacked copy of the working directory. Training reads the ingest output by the same
relative path (`runs/ingest/debug-128`) resolved against the same root.

The working directory is a copy of what the two jobs read (their configs and data/corpus), without
the `pipelines` package itself: the job imports it from the installation. The head is ended by
killing exactly the processes that carry this test's marker in their environment (never `ray stop`,
which would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.integration.local_processes import MARKER_VAR, free_port, marked_pids, stop_marked

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
WROTE = re.compile(r"^wrote (.+?): (.+)$", re.M)


class LocalHead:
    """`ray start --head` on loopback with the dashboard (the job API); ends only its own processes."""

    def __init__(self):
        self.marker = f"raymoe-job-submit-{uuid.uuid4().hex}"
        self.port = free_port()
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        # Short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rmjs-", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
        # `python` in a job's entrypoint is the venv's; the job inherits the head's environment.
        env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"
        self.env = dict(
            env,
            **{MARKER_VAR: self.marker},
            RAY_AUTH_MODE="disabled",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_USAGE_STATS_ENABLED="0",
            OMP_NUM_THREADS="1",
        )

    def start(self) -> None:
        started = subprocess.run(
            [
                str(RAY),
                "start",
                "--head",
                f"--port={self.port}",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.temp_dir}",
                "--num-cpus=2",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
                "--object-store-memory=200000000",
                f"--ray-client-server-port={free_port()}",
                f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                "--min-worker-port=0",
                "--max-worker-port=0",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-3000:]}"

    def submit(self, working_dir: Path, env_vars: dict[str, str], *entrypoint: str) -> str:
        """`ray job submit --working-dir .` from `working_dir`; waits and returns the job's output."""
        done = subprocess.run(
            [
                str(RAY),
                "job",
                "submit",
                "--address",
                self.dashboard,
                "--working-dir",
                ".",
                "--runtime-env-json",
                json.dumps({"env_vars": env_vars}),
                "--",
                *entrypoint,
            ],
            cwd=working_dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0 and "succeeded" in done.stdout, (
            f"job {entrypoint} failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
        )
        return done.stdout

    def own_pids(self) -> list[int]:
        return marked_pids(self.marker)

    def stop(self) -> None:
        stop_marked(self.marker)


@pytest.fixture
def head():
    cluster = LocalHead()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        survivors = cluster.own_pids()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        assert survivors == [], f"processes of the test's Ray head survived: {survivors}"


def working_copy(dest: Path) -> Path:
    """What the two jobs read: their configs (as configs/) and the shipped corpus."""
    (dest / "configs").mkdir(parents=True)
    for name in ("ingest.debug.yaml", "train.debug.yaml"):
        shutil.copy(ROOT / "pipelines" / "configs" / name, dest / "configs" / name)
    shutil.copytree(ROOT / "data" / "corpus", dest / "data" / "corpus")
    return dest


def written(output: str) -> dict[str, Path]:
    return {what: Path(path) for what, path in WROTE.findall(output)}


def test_submitted_jobs_write_under_the_storage_root_and_say_where(tmp_path, head):
    # Prepare: a working directory to submit, a storage root outside Ray's temporary folder.
    work = working_copy(tmp_path / "work")
    root = tmp_path / "storage"
    env_vars = {"RAYMOE_STORAGE_ROOT": str(root)}

    # Execute: ingest (rows of 128 + 1 tokens, where training reads them), then 2 training steps.
    ingest = head.submit(
        work,
        env_vars,
        "python",
        "-m",
        "pipelines.ingest",
        "--config",
        "configs/ingest.debug.yaml",
        "pack.seq_len=128",
        "output_dir=runs/ingest/debug-128",
    )
    train = head.submit(
        work,
        env_vars,
        "python",
        "-m",
        "pipelines.train",
        "--config",
        "configs/train.debug.yaml",
        "steps=2",
        "log_every=1",
    )

    # Assert: each job said where it wrote, and it is there, under the root, outside Ray's temp.
    assert written(ingest) == {
        "ingest output": root / "runs/ingest/debug-128",
        "manifest": root / "runs/ingest/debug-128/manifest.json",
    }, ingest[-3000:]
    assert written(train) == {
        "checkpoints": root / "runs/train-debug/checkpoints",
        "history": root / "runs/train-debug/train-history.jsonl",
    }, train[-3000:]
    for path in [*written(ingest).values(), *written(train).values()]:
        assert path.is_absolute() and path.exists(), path
        assert not path.resolve().is_relative_to(Path(head.temp_dir).resolve()), path
    assert json.loads((root / "runs/ingest/debug-128/manifest.json").read_text())["seq_len"] == 128
    assert (root / "runs/train-debug/checkpoints/step-00000002").is_dir()
    # Nothing went to Ray's unpacked copy of the working directory (where relative paths used to go).
    unpacked = list(Path(head.temp_dir).glob("session_*/runtime_resources/working_dir_files/*"))
    assert unpacked, "no unpacked working directory found under Ray's temp dir"
    assert not [p for p in unpacked if (p / "runs").exists()]
