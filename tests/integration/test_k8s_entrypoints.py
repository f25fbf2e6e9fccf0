"""The committed RayJob entrypoints and the RayService's serveConfigV2 run for real on a local cluster.

What KubeRay does, without Kubernetes: each RayJob's `entrypoint` (read from k8s/base/jobs/) goes
through Ray's Jobs API with the job's `runtimeEnvYAML`, as KubeRay's submitter pod runs `ray job
submit`; the RayService's `serveConfigV2` goes to the dashboard's Serve REST API, as the operator
sends it. The jobs run as the chain they form on the cluster: ingest -> train (+ export) ->
finetune, federated, drift on the exported model; then the app serves that model.

Differences from the cluster, each deliberate:
- the shared volume's mount path (/mnt/raymoe) is a temporary directory;
- tiny-run overrides are appended to each command line (fewer steps, one round, a smaller corpus,
  debug traffic for drift) so the chain takes minutes on 2 cores;
- the local cluster offers the federated silos' custom resources on its one node (the silo worker
  groups offer them on the cluster), and Serve's HTTP port is a free local port.
The cluster's working directory holds only links to the repository's `pipelines/` and `data/`, as
the image's read-only /opt/raymoe would: a job that wrote outside the mount path would leave files
there, and the test fails on them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration import local_processes
from tests.integration.local_processes import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "k8s" / "base" / "jobs"
MOUNT = "/mnt/raymoe"
API_KEY = "test-key-for-the-serve-secret"
# Appended to the committed command lines: a tiny run of each pipeline.
TINY = {
    "ingest": ["sources=[{name: prose, paths: [data/corpus/prose.jsonl.gz], id_field: id}]", "pack.rows_per_shard=256"],
    "train": ["steps=3", "checkpoint.every_steps=3", "log_every=1"],
    "finetune": ["steps=2", "log_every=1", "eval_path="],
    "federated": ["rounds=1", "local_steps=1"],
    # Debug windows into the job's current.dir, served by the trained artifact it evaluates.
    "drift": [f"debug_traffic.dir={MOUNT}/traffic", f"debug_traffic.artifact={MOUNT}/models/train", "linger_s=0"],
}
EXIT_DRIFT = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local cluster with the dashboard (Jobs and Serve REST APIs), run from a bare app dir."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # another module's cluster has no dashboard; it restarts on its next use
    app_dir = tmp_path_factory.mktemp("app")
    for name in ("pipelines", "data"):
        (app_dir / name).symlink_to(ROOT / name)
    mount = tmp_path_factory.mktemp("mnt")
    saved_env = {k: os.environ.get(k) for k in ("RAYMOE_API_KEY", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "PATH")}
    # The Serve secret, as the container env carries it; loopback addresses for the job drivers
    # (they reach the GCS through RAY_ADDRESS, which Ray would otherwise rewrite to the host's IP);
    # `python` and `raymoe` of this environment first on PATH, as the image's are.
    os.environ.update(
        RAYMOE_API_KEY=API_KEY,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    cwd = os.getcwd()
    os.chdir(app_dir)  # raylet, workers and job drivers inherit it, as /opt/raymoe in the image
    dashboard_port = free_port()
    # Its own temp dir with this cluster's address file (written below, as `ray start` writes
    # one): Ray's job supervisor gives each job driver the RAY_ADDRESS it reads from the address
    # file in the cluster's temp dir, and without one it takes any GCS it finds running on the
    # machine (under `make test`, often another module's cluster). Short: Ray's socket paths
    # under it must stay within AF_UNIX's 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rmk8s-", dir="/tmp")
    try:
        with local_processes.own_agent_port():
            ray.init(
                address="local",
                num_cpus=4,
                resources={"silo_code": 1, "silo_prose": 1, "silo_chat": 1},
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                _node_ip_address="127.0.0.1",
                _temp_dir=temp_dir,
                log_to_driver=False,
            )
        Path(temp_dir, "ray_current_cluster").write_text(ray.get_runtime_context().gcs_address)
        yield {"app_dir": app_dir, "mount": mount, "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        os.chdir(cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def committed_job(name: str) -> dict:
    return yaml.safe_load((JOBS / f"rayjob.{name}.yaml").read_text())["spec"]


def run_job(cluster, name: str, timeout_s: float = 600) -> tuple[str, int | None, str]:
    """Submits the committed entrypoint of pipeline `name`; returns (status, exit code, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = committed_job(name)
    assert MOUNT in spec["entrypoint"], "the entrypoint should write under the shared volume"
    commands = spec["entrypoint"].replace(MOUNT, str(cluster["mount"])).split(" && ")
    commands[0] += " " + " ".join(shlex.quote(o.replace(MOUNT, str(cluster["mount"]))) for o in TINY[name])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    client = JobSubmissionClient(cluster["dashboard"])
    # The head's job agent registers a little after the dashboard answers (later still on busy
    # cores); until then Ray answers 500 "No available agent to submit job, please try again
    # later", as KubeRay's submitter would retry.
    agent_deadline = time.monotonic() + 60
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=" && ".join(commands),
                runtime_env=runtime_env,
                entrypoint_num_cpus=spec.get("entrypointNumCpus", 0),
            )
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > agent_deadline:
                raise
            time.sleep(2)
    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"{name} still {status} after {timeout_s} s"
        time.sleep(2)
    info = client.get_job_info(job_id)
    return status.value, info.driver_exit_code, client.get_job_logs(job_id)


def assert_app_dir_untouched(cluster) -> None:
    assert sorted(p.name for p in cluster["app_dir"].iterdir()) == ["data", "pipelines"], (
        "a job wrote into its working directory (read-only in the image): use the mount path"
    )


def test_ingest_job(cluster):
    status, _, logs = run_job(cluster, "ingest")
    assert status == "SUCCEEDED", logs[-3000:]
    assert (cluster["mount"] / "data" / "ingest" / "manifest.json").is_file()
    assert_app_dir_untouched(cluster)


def test_train_job_trains_and_exports(cluster):
    if not (cluster["mount"] / "data" / "ingest" / "manifest.json").is_file():
        pytest.skip("needs the ingest job's output")
    status, _, logs = run_job(cluster, "train")
    assert status == "SUCCEEDED", logs[-3000:]
    model = cluster["mount"] / "models" / "train"
    assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))
    assert_app_dir_untouched(cluster)


@pytest.fixture
def exported(cluster):
    if not (cluster["mount"] / "models" / "train" / "config.json").is_file():
        pytest.skip("needs the train job's exported model")
    return cluster


def test_finetune_job(exported):
    status, _, logs = run_job(exported, "finetune")
    assert status == "SUCCEEDED", logs[-3000:]
    assert list((exported["mount"] / "finetune").rglob("adapter_model.safetensors"))
    assert_app_dir_untouched(exported)


def test_federated_job(exported):
    status, _, logs = run_job(exported, "federated")
    assert status == "SUCCEEDED", logs[-3000:]
    assert list((exported["mount"] / "federated").rglob("adapter_model.safetensors"))
    assert_app_dir_untouched(exported)


def test_drift_job_reports_drift_with_its_exit_code(exported):
    # The debug traffic is code prompts, then prose: drift is there to find, and the job says so
    # with exit code 3 (which the RayJob shows as Failed, hence its backoffLimit of 0).
    status, code, logs = run_job(exported, "drift")
    assert (status, code) == ("FAILED", EXIT_DRIFT), logs[-3000:]
    assert json.loads((exported["mount"] / "drift" / "drift.json").read_text())
    assert committed_job("drift")["backoffLimit"] == 0
    assert_app_dir_untouched(exported)


def test_serve_config_serves_the_exported_model(exported):
    # Prepare: the committed serveConfigV2 with the mount path swapped and a free HTTP port.
    service = yaml.safe_load((ROOT / "k8s" / "base" / "rayservice.serve.yaml").read_text())["spec"]
    config = yaml.safe_load(service["serveConfigV2"].replace(MOUNT, str(exported["mount"])))
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    assert app["import_path"] == "raymoe.serve.app:build_app"
    # Execute: deploy through the dashboard's Serve REST API, as the KubeRay operator does.
    request = urllib.request.Request(
        f"{exported['dashboard']}/api/serve/applications/",
        method="PUT",
        data=json.dumps(config).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
    try:
        deadline = time.monotonic() + 300
        while True:
            with urllib.request.urlopen(f"{exported['dashboard']}/api/serve/applications/", timeout=30) as r:
                state = json.loads(r.read())["applications"].get(app["name"], {}).get("status")
            if state == "RUNNING":
                break
            assert state not in ("DEPLOY_FAILED", "UNHEALTHY") and time.monotonic() < deadline, state
            time.sleep(2)
        body = {"model": app["args"]["model_id"], "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
        chat = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
        )
        with urllib.request.urlopen(chat, timeout=120) as r:
            reply = json.loads(r.read())
        # Assert: an OpenAI-style answer, behind the key from the Secret, traffic sampled to the volume.
        assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] >= 1
        unauthorised = urllib.request.Request(
            chat.full_url, data=chat.data, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(unauthorised, timeout=60)
    finally:
        from ray import serve

        serve.shutdown()
    assert_app_dir_untouched(exported)
