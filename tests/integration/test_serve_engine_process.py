"""The replica's engine process under Ray Serve: a killed engine gives 503 + Retry-After, the
health check restarts the replica with a new engine process, and deleting the app leaves no
engine process behind."""

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from raymoe.serve.debug_artifact import make_debug_artifact
from tests.integration.local_processes import free_port


def engine_processes() -> set[int]:
    """Engine processes whose parent is a replica of this module's app "proc" (other test modules
    running beside this one have engine processes of their own)."""
    out = subprocess.run(["pgrep", "-f", "raymoe.serve.engine_process"], capture_output=True, text=True)
    ours = set()
    for pid in map(int, out.stdout.split()):
        try:
            parent = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1]
            if "ServeReplica:proc:" in Path(f"/proc/{parent}/cmdline").read_text():
                ours.add(pid)
        except OSError:
            continue  # exited meanwhile
    return ours


def completion(url: str) -> httpx.Response:
    body = {"model": "tiny-moe", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    from raymoe.serve.app import build_app

    artifact = str(make_debug_artifact(tmp_path_factory.mktemp("proc") / "tiny-moe", seed=2))
    port = free_port()
    before = engine_processes()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            {
                "model_path": artifact,
                "num_cpus": 0.25,
                "api_key_env": "",
                "health_check_period_s": 1.0,
                "engine": {"num_slots": 2, "num_threads": 1},
            }
        ),
        name="proc",
        route_prefix="/",
    )
    yield f"http://127.0.0.1:{port}", before
    serve.shutdown()


def test_killed_engine_is_503_then_the_replica_comes_back_and_delete_cleans_up(served):
    from ray import serve

    url, before = served
    first = completion(url)
    assert first.status_code == 200
    ours = engine_processes() - before
    assert len(ours) == 1
    os.kill(ours.pop(), signal.SIGKILL)

    refused = wait_for(lambda: (r := completion(url)).status_code == 503 and r, 30, "a 503 from the dead engine")
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "server_error"
    back = wait_for(lambda: (r := completion(url)).status_code == 200 and r, 90, "the restarted replica")
    assert back.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]  # same greedy text
    assert len(engine_processes() - before) == 1

    serve.delete("proc")
    wait_for(lambda: not (engine_processes() - before), 60, "the engine process to exit after delete")
