"""Autoscaling as rendered, on this machine: Ray's fake multi-node autoscaler (v2) configured from
the RayCluster / RayService manifests, and Serve replica autoscaling under a burst.

The autoscaling config comes from Ray's own KubeRay translation
(`ray.autoscaler._private.kuberay.autoscaling_config._derive_autoscaling_config_from_ray_cr`, the
code KubeRay's autoscaler sidecar runs on the RayCluster object) applied to the rendered manifest;
only the node provider is swapped for Ray's fake multi-node provider, which starts each "pod" as a
local raylet. `ray.cluster_utils.AutoscalingCluster` does the same, but its start and shutdown run
`ray stop --force` (every Ray process on the machine) and its bundled example.yaml is missing from
the Ray 2.60 wheel, so the cluster is started here with `ray start` on free loopback ports and
ended by killing exactly the processes that carry this test's marker in their environment.

Deliberate differences from the cluster, each for test time on 2 cores: the idle timeout is 10 s
(the manifests say 30-60 s), Serve's delays are a few seconds (Ray's defaults are 30 s / 600 s),
the fake nodes drop Ray's `memory` resource (the fake provider passes resources as custom
resources, where Ray refuses `memory`), and Serve's proxy runs on the head only (every fake node
shares one host and would bind the same port).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from raymoe.deploy.manifests.presets import cpu_dev
from raymoe.deploy.manifests.raycluster import raycluster
from raymoe.deploy.manifests.rayservice import rayservice
from raymoe.deploy.manifests.values import DeployValues, PodResources
from raymoe.deploy.manifests.yaml_text import plain
from tests.integration.local_processes import free_port, marked_pids, stop_marked

pytestmark = pytest.mark.slow

IDLE_TIMEOUT_S = 10
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
FAKE_HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"


def wait_for(what: str, check, timeout_s: float = 180.0, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(every_s)


def autoscaling_config(ray_cr: dict, gcs_address: str) -> dict:
    """Ray's KubeRay translation of `ray_cr`, on the fake multi-node provider."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    config = _derive_autoscaling_config_from_ray_cr(ray_cr)
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    types["ray.head.default"] = dict(head, max_workers=0)
    for node_type in types.values():
        node_type["resources"].pop("memory", None)
        node_type["resources"]["object_store_memory"] = 100 * 2**20
    config["head_node_type"] = "ray.head.default"
    config["provider"] = {
        "type": "external",
        "module": FAKE_PROVIDER,
        "gcs_address": gcs_address,
        "head_node_id": FAKE_HEAD_ID,
        "launch_multiple": True,
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    }
    return config


class FakeKubeRayCluster:
    """`ray start --head` with the autoscaler on the fake provider; ends only its own processes."""

    def __init__(self, ray_cr: dict, tmp_path: Path):
        self.marker = f"raymoe-autoscaling-{uuid.uuid4().hex}"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = autoscaling_config(ray_cr, self.address)
        self.tmp = tmp_path
        self.config_path = tmp_path / "autoscaling.json"
        self.config_path.write_text(json.dumps(self.config))
        # Short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rmas-", dir="/tmp")

    def start(self) -> None:
        env = dict(
            os.environ,
            RAYMOE_TEST_CLUSTER=self.marker,
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_FAKE_CLUSTER="1",
            RAY_enable_autoscaler_v2="1",
            RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_ID,
            RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_ID,
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            OMP_NUM_THREADS="1",
        )
        head_cpus = self.config["available_node_types"]["ray.head.default"]["resources"]["CPU"]
        started = subprocess.run(
            [
                str(Path(sys.executable).with_name("ray")),
                "start",
                "--head",
                f"--port={self.port}",
                f"--autoscaling-config={self.config_path}",
                f"--num-cpus={head_cpus}",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false",
                "--object-store-memory=100000000",
                f"--ray-client-server-port={free_port()}",
                f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                "--min-worker-port=0",
                "--max-worker-port=0",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-3000:]}"

    def own_pids(self) -> list[int]:
        return marked_pids(self.marker)

    def stop(self) -> None:
        stop_marked(self.marker)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def workers(self, cpus: float) -> int:
        """Alive worker nodes with `cpus` CPUs (the head has 0)."""
        import ray

        return sum(
            1
            for n in ray.nodes()
            if n["Alive"] and n["Resources"].get("CPU", 0) == cpus and n["NodeID"] != FAKE_HEAD_ID
        )


@pytest.fixture
def connect(monkeypatch):
    """Connects this process to a FakeKubeRayCluster over loopback."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        ray.shutdown()  # another module's in-process cluster; it restarts on its next use
    # Otherwise ray.init rewrites 127.0.0.1 to the host's address, where this cluster is not.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    clusters = []

    def _connect(cluster: FakeKubeRayCluster):
        clusters.append(cluster)
        cluster.start()
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)

    yield _connect
    ray.shutdown()
    for cluster in clusters:
        cluster.stop()
        assert cluster.own_pids() == [], "processes of the test cluster survived"


def test_raycluster_worker_group_scales_to_its_max_and_idles_back(tmp_path, connect):
    # Prepare: the cpu-dev RayCluster (one CPU group, 0..2 pods of 2 CPUs), idle timeout shortened.
    import ray

    values = cpu_dev(DeployValues())
    values.autoscaler.idle_timeout_s = IDLE_TIMEOUT_S
    manifest = plain(raycluster(values))
    group = manifest["spec"]["workerGroupSpecs"][0]
    cpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    cluster = FakeKubeRayCluster(manifest, tmp_path)
    assert cluster.config["available_node_types"][group["groupName"]]["max_workers"] == group["maxReplicas"] == 2
    assert cluster.config["idle_timeout_minutes"] == IDLE_TIMEOUT_S / 60
    connect(cluster)

    @ray.remote(num_cpus=cpus)
    class Busy:
        def ready(self) -> bool:
            return True

    # Execute: more pods' worth of actors than the group may hold.
    actors = [Busy.remote() for _ in range(group["maxReplicas"] + 2)]
    wait_for("the group to reach maxReplicas", lambda: cluster.workers(cpus) == group["maxReplicas"])
    ready, _ = ray.wait([a.ready.remote() for a in actors], num_returns=group["maxReplicas"], timeout=120)
    assert len(ready) == group["maxReplicas"]
    time.sleep(5)  # more autoscaler rounds with demand still pending: it must stop at the maximum
    assert cluster.workers(cpus) == group["maxReplicas"]
    for actor in actors:
        ray.kill(actor)
    released = time.monotonic()
    time.sleep(IDLE_TIMEOUT_S / 2)
    assert cluster.workers(cpus) == group["maxReplicas"], "an idle node went before its idle timeout"
    wait_for("the idle nodes to be removed", lambda: cluster.workers(cpus) == group["minReplicas"], timeout_s=120)
    # Assert: both removed, after the idle timeout (it counts from when each node fell idle).
    assert time.monotonic() - released >= IDLE_TIMEOUT_S


def serve_values(tmp_path: Path) -> DeployValues:
    """cpu-dev serving with one 1-CPU replica per 1-CPU pod (so replicas add pods), short delays."""
    values = cpu_dev(DeployValues())
    values.autoscaler.idle_timeout_s = IDLE_TIMEOUT_S
    values.serve.worker = PodResources(cpu="1", memory="4Gi")
    values.serve.scaling.upscale_delay_s = 2.0
    values.serve.scaling.downscale_delay_s = 4.0
    values.serve.app.update(
        model_path=str(tmp_path / "model"),
        traffic={"enabled": False},
        engine={"num_slots": 2, "max_tokens_per_step": 64, "max_waiting": 64, "num_threads": 1},
    )
    return values


def replicas(app: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[app]
    deployment = next(iter(status.deployments.values()))
    return {getattr(k, "value", str(k)): v for k, v in deployment.replica_states.items()}


def test_serve_replicas_and_serving_pods_follow_a_burst(tmp_path, connect):
    # Prepare: the rendered RayService: its serving group bounds and the app args (autoscaling).
    from ray import serve

    from raymoe.serve.app import build_app
    from raymoe.serve.debug_artifact import make_debug_artifact

    values = serve_values(tmp_path)
    make_debug_artifact(tmp_path / "model")
    manifest = plain(rayservice(values))
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    args = config["applications"][0]["args"]
    scaling = args["autoscaling"]
    group = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (scaling["min_replicas"], scaling["max_replicas"]) == (1, 2)
    ray_cr = {
        "metadata": {"name": manifest["metadata"]["name"], "namespace": "test"},
        "spec": manifest["spec"]["rayClusterConfig"],
    }
    cluster = FakeKubeRayCluster(ray_cr, tmp_path)
    connect(cluster)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(build_app(args), name="raymoe", route_prefix="/")
    wait_for("the first replica", lambda: replicas("raymoe").get("RUNNING") == scaling["min_replicas"])
    assert cluster.workers(1.0) == group["minReplicas"]

    # Execute: a burst of long generations, kept up until Serve reports the maximum.
    stop = threading.Event()
    body = json.dumps(
        {"model": args["model_id"], "prompt": "The quick brown fox", "max_tokens": 16, "ignore_eos": True}
    ).encode()

    def client():
        while not stop.is_set():
            api_key = os.environ.get("RAYMOE_API_KEY", "")
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                data=body,
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
            )
            try:
                urllib.request.urlopen(request, timeout=120).read()
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(int(3 * scaling["target_ongoing_requests"]))]
    for t in threads:
        t.start()
    try:
        wait_for(
            "Serve to reach max_replicas",
            lambda: replicas("raymoe").get("RUNNING") == scaling["max_replicas"],
            timeout_s=240,
        )
        # Assert: the Ray autoscaler gave the second replica its pod, within the group's bounds.
        assert cluster.workers(1.0) == group["maxReplicas"]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
    wait_for(
        "Serve to go back to min_replicas",
        lambda: (
            replicas("raymoe").get("RUNNING") == scaling["min_replicas"]
            and sum(replicas("raymoe").values()) == scaling["min_replicas"]
        ),
        timeout_s=240,
    )
    wait_for("the idle serving pod to be removed", lambda: cluster.workers(1.0) == group["minReplicas"], timeout_s=120)
    serve.shutdown()


def test_serve_defaults_are_ray_serves_own():
    # The values cite Ray Serve's AutoscalingConfig defaults; check them against Ray itself.
    from ray.serve.config import AutoscalingConfig

    ray_defaults = AutoscalingConfig()
    ours = DeployValues().serve.scaling
    assert (ours.upscale_delay_s, ours.downscale_delay_s) == (
        ray_defaults.upscale_delay_s,
        ray_defaults.downscale_delay_s,
    )
