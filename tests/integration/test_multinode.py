"""Expert parallelism across the nodes of a local multi-node Ray cluster (`ray.cluster_utils.Cluster`).

A head with no CPUs (the driver, Ray Train's controller, Serve's controller and proxy) and worker
nodes of exactly one logical CPU each; every Train worker and every shard worker asks for one CPU,
so at most one lands on a node and placement is forced by resources, not by luck.

- training at ep=2 puts each expert shard (Train rank) on its own worker node (node ids);
- a worker node removed mid-run (the one holding rank 0, after checkpoint 2 was written) costs one
  restart: the run resumes from checkpoint 2, the last one written before the node went (a gate in
  the test's wrapper of the worker body holds the first attempt there until the node is gone),
  finishes on the surviving nodes and writes its last checkpoint;
- serving at ep=2 puts each shard worker on its own worker node; removing one shard worker's node
  while three clients have requests in flight fails those requests with a retryable 503 carrying
  OpenAI error JSON (no hang, no 500), and the app serves the same greedy text again within a
  bounded wait, with no manual step (Serve's health check replaces the replica, whose new shard
  workers take two surviving worker nodes).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from raymoe.config import from_dict
from raymoe.serve.debug_artifact import make_debug_artifact
from raymoe.train.checkpoint_format import list_checkpoints
from raymoe.train.config import TrainConfig
from tests.integration.local_processes import free_port
from tests.unit.ingest_output import write_ingest_output

# Worker nodes the fixture keeps: ep=2 uses two, the third takes over from a removed one.
NUM_WORKER_NODES = 3
SEQ_LEN = 32


def _add_worker_node(c, wait: bool = True):
    return c.add_node(wait=wait, num_cpus=1, node_ip_address="127.0.0.1")


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs) + NUM_WORKER_NODES nodes of one CPU; yields the `Cluster`."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the shared single-node test cluster; later modules start it again
    # Token auth is decided explicitly: off for this loopback-only cluster (Ray 2.60 turns it on).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Every node binds to 127.0.0.1; ray.init(address="127.0.0.1:port") would otherwise rewrite the
    # loopback address to the machine's network address, where nothing listens.
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    # Without the dashboard Ray still starts a stub on dashboard_port (8265 by default) and
    # records that address; Ray Train's placement-group cleaner asks it whether the controller
    # lives. Another cluster's dashboard on 8265 answers "no such actor", and the cleaner
    # removes this run's placement group (seen here): a port of this cluster's own avoids that.
    head = {"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False, "dashboard_port": free_port()}
    c = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(NUM_WORKER_NODES):
            _add_worker_node(c, wait=False)  # the nodes start side by side
        c.wait_for_nodes()
        ray.init(
            address=c.address,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}},
        )
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = True


@pytest.fixture
def worker_nodes(cluster):
    """The cluster's worker nodes, topped up to NUM_WORKER_NODES (a test may have removed one)."""
    while len(cluster.worker_nodes) < NUM_WORKER_NODES:
        _add_worker_node(cluster)
    return {node.node_id: node for node in cluster.worker_nodes}


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    # 64 rows of seq_len + 1 random tokens below the debug model's vocabulary.
    rows = np.random.default_rng(0).integers(3, 2048, size=(64, SEQ_LEN + 1)).astype(np.int32)
    return str(write_ingest_output(tmp_path_factory.mktemp("multinode") / "data", rows, rows_per_shard=16))


def _train_cfg(tmp_path: Path, data: str) -> TrainConfig:
    """4 steps at ep=2, a checkpoint every 2 (all kept), one restart allowed."""
    cfg = {
        "name": "interrupted",
        "flavour": "debug",
        "steps": 4,
        "seed": 5,
        "layout": {"ep": 2, "dp": 1},
        "optim": {"warmup_steps": 0},
        "data": {"path": data, "seq_len": SEQ_LEN, "global_batch_size": 4},
        "checkpoint": {"uri": str(tmp_path / "ckpt"), "every_steps": 2, "keep": 0},
        # One CPU per worker, the whole of a worker node: two workers never share a node.
        "num_cpus_per_worker": 1,
        "storage_path": str(tmp_path / "ray"),
        "log_every": 1,
        "failure": {"max_failures": 1},
    }
    return from_dict(TrainConfig, cfg)


def _instrumented_worker_body(log: Path, gate: Path):
    """The platform's Train worker body, run unchanged after two test-only additions:

    - each worker appends {rank, node_id, pid} to `log` when it starts (placement, per attempt);
    - after each checkpoint a worker waits until the file `gate` exists (at most 5 minutes), so
      the first attempt cannot train past its first checkpoint before the test has removed a
      node: which checkpoint the run must resume from is then known (step 2), not a race.

    A closure, so Ray pickles it by value into the workers.
    """
    import raymoe.train.loop

    body, log_path, gate_path = raymoe.train.loop.train_loop_per_worker, str(log), str(gate)

    def placed_then_train(loop_config):
        import json
        import os
        import time

        import ray
        import ray.train

        import raymoe.train.worker

        rank = ray.train.get_context().get_world_rank()
        line = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        with open(log_path, "a") as fh:  # one short O_APPEND write per worker
            fh.write(json.dumps(line) + "\n")
        save = raymoe.train.worker.save_checkpoint

        def save_then_wait(*args, **kwargs):
            path = save(*args, **kwargs)
            deadline = time.monotonic() + 300
            while not os.path.exists(gate_path) and time.monotonic() < deadline:
                time.sleep(0.05)
            return path

        raymoe.train.worker.save_checkpoint = save_then_wait  # this worker process only
        body(loop_config)

    return placed_then_train


def _placements(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


class InterruptedRun(NamedTuple):
    cfg: TrainConfig
    result: Any  # ray.train.Result
    # {rank, node_id, pid} per started worker, in start order: attempt 1's two, then attempt 2's.
    placements: list[dict]
    # node_id: the node removed; rank0_dead: rank 0's worker process was seen gone.
    removed: dict
    worker_nodes: set[str]  # at the start


@pytest.fixture(scope="module")
def interrupted_run(cluster, train_data, tmp_path_factory) -> InterruptedRun:
    """A 4-step ep=2 run, checkpoint every 2 steps, one restart allowed. Once checkpoint 2 is
    committed, the node of rank 0 (the rank that commits checkpoints) is removed; the gate opens
    when rank 0's process is gone, so the first attempt commits nothing after step 2.

    Returns:
        An `InterruptedRun`.
    """
    import raymoe.train.loop
    from raymoe.train.loop import run_training

    tmp = tmp_path_factory.mktemp("interrupted")
    log, gate = tmp / "placement.jsonl", tmp / "gate"
    cfg = _train_cfg(tmp, train_data)
    nodes = {node.node_id: node for node in cluster.worker_nodes}
    removed: dict = {}
    finished = threading.Event()

    def remove_rank0_node_after_first_checkpoint():
        try:
            while not list_checkpoints(cfg.checkpoint.uri) and not finished.is_set():
                time.sleep(0.05)
            first = {p["rank"]: p for p in _placements(log)[:2]}
            if finished.is_set() or 0 not in first:
                return
            removed["node_id"], pid = first[0]["node_id"], first[0]["pid"]
            cluster.remove_node(nodes[removed["node_id"]], allow_graceful=False)
            deadline = time.monotonic() + 60
            while not _dead(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            removed["rank0_dead"] = _dead(pid)
        finally:
            gate.touch()

    remover = threading.Thread(target=remove_rank0_node_after_first_checkpoint, daemon=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(raymoe.train.loop, "train_loop_per_worker", _instrumented_worker_body(log, gate))
        remover.start()
        try:
            result = run_training(cfg)
        finally:
            finished.set()
            remover.join()
    return InterruptedRun(cfg, result, _placements(log), removed, set(nodes))


def test_train_ranks_on_their_own_nodes(interrupted_run):
    run = interrupted_run
    # Assert: the first attempt's two ranks ran on two different worker nodes (the head has no
    # CPU for either).
    first = {p["rank"]: p["node_id"] for p in run.placements[:2]}
    assert sorted(first) == [0, 1], run.placements
    assert first[0] != first[1]
    assert set(first.values()) <= run.worker_nodes


def test_removed_node_resumes_from_last_checkpoint(interrupted_run):
    run = interrupted_run
    removed, result, placements = run.removed, run.result, run.placements
    # Assert: rank 0's node went after checkpoint 2 (its worker died), and the run still
    # finished all 4 steps after one restart ...
    assert removed.get("rank0_dead"), f"rank 0's node was not removed, or its worker never died: {removed}"
    assert result.error is None, result.error
    assert result.metrics["step"] == 4
    # ... resuming from checkpoint 2, the last one written before the node went (the gate held
    # the first attempt there), and writing checkpoint 4 itself.
    assert result.metrics["start_step"] == 2
    assert list_checkpoints(run.cfg.checkpoint.uri) == [2, 4]
    # The second attempt placed its two ranks on two surviving worker nodes.
    assert len(placements) == 4, placements
    again = {p["rank"]: p["node_id"] for p in placements[2:]}
    assert sorted(again) == [0, 1]
    assert again[0] != again[1]
    survivors = run.worker_nodes - {removed["node_id"]}
    assert set(again.values()) <= survivors


# Serving: a tiny artifact, token-id prompts (no tokenizer round trip in the comparison).
SHAPE = {"dim": 64, "num_layers": 2, "max_seq_len": 128}
GREEDY = {"model": "moe8", "prompt": [5, 6, 7, 8, 9, 10, 11], "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return str(make_debug_artifact(tmp_path_factory.mktemp("multinode") / "moe8", seed=2, **SHAPE))


def _shard_workers() -> dict[str, tuple[str, int]]:
    """{actor id: (node id, pid)} of the ShardWorker actors the GCS lists as alive (its actor
    table: this cluster has no dashboard for Ray's state API). A removed node's actors stay
    listed as alive until the GCS has declared the node dead."""
    import ray

    table = ray._private.state.actors().values()
    return {
        a["ActorID"]: (a["Address"]["NodeID"], a["Pid"])
        for a in table
        if a["ActorClassName"] == "ShardWorker" and a["State"] == "ALIVE"
    }


def _is_retryable_openai_error(reply) -> bool:
    """A 503 with Retry-After whose body is OpenAI error JSON {"error": {message, type, param, code}}."""
    try:
        error = reply.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (
        reply.status_code == 503
        and "retry-after" in reply.headers
        and isinstance(error, dict)
        and {"message", "type", "param", "code"} <= set(error)
    )


def test_serving_loses_a_shard_node_and_recovers(cluster, worker_nodes, artifact) -> None:
    import httpx
    from ray import serve

    from raymoe.serve.app import build_app

    # Prepare: a node only the replica fits on (2 CPUs, the replica asks for 2), so its two shard
    # workers (1 CPU each) must take two of the one-CPU worker nodes.
    serve_node = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/completions"
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            build_app(
                {
                    "model_path": artifact,
                    "api_key_env": "",
                    "num_cpus": 2,
                    "ep": 2,
                    "shard_num_cpus": 1,
                    "shard_num_threads": 1,
                    # Serve probes the replica every second; a broken shard group fails the probe.
                    "health_check_period_s": 1,
                    "engine": {"num_slots": 4, "num_threads": 1},
                }
            ),
            name="ep",
            route_prefix="/",
        )
        before = httpx.post(url, json=GREEDY, timeout=60)
        assert before.status_code == 200, before.text
        shards = _shard_workers()
        nodes = [node for node, _ in shards.values()]
        # Assert: one shard worker per worker node.
        assert len(nodes) == 2 and nodes[0] != nodes[1], shards
        assert set(nodes) <= set(worker_nodes)

        # Execute: three clients send requests back to back; once each has had an answer, the
        # node of one shard worker is removed, and its process is watched until it has died.
        replies: list[tuple[float, float, httpx.Response | httpx.HTTPError]] = []  # (sent, answered, reply)
        stop = threading.Event()

        def client(i: int) -> None:
            # Back to back, so some of the three clients' requests are always in the engine.
            body = {"model": "moe8", "prompt": [20 + i, 30 + i, 40 + i], "max_tokens": 48, "temperature": 0}
            with httpx.Client(timeout=90) as http:
                while not stop.is_set():
                    sent = time.time()
                    try:
                        reply: httpx.Response | httpx.HTTPError = http.post(url, json=body)
                    except httpx.HTTPError as exc:  # a hang (timeout) or a dropped connection
                        reply = exc
                    replies.append((sent, time.time(), reply))

        def answered() -> int:
            return sum(isinstance(r, httpx.Response) and r.status_code == 200 for _, _, r in replies)

        clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 60
        while answered() < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answered() >= 3, replies
        lost, pid = nodes[1], next(pid for node, pid in shards.values() if node == nodes[1])
        cluster.remove_node(worker_nodes[lost], allow_graceful=False)
        deadline = time.monotonic() + 60
        while not _dead(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _dead(pid), f"the shard worker on the removed node (pid {pid}) is still running"
        died_at = time.time()
        # No manual step: the app must answer the greedy request again within two minutes; every
        # answer until then must be a retryable 503. (Polled only from here: until the worker's
        # process is gone, the old replica may still answer.)
        waiting: list[httpx.Response] = []
        after = None
        deadline = time.monotonic() + 120
        while after is None and time.monotonic() < deadline:
            reply = httpx.post(url, json=GREEDY, timeout=90)
            if reply.status_code == 200:
                after = reply
            else:
                waiting.append(reply)
                time.sleep(0.2)
        stop.set()
        for t in clients:
            t.join(timeout=120)

        # Assert: served again, with the same greedy text as before the node went.
        assert after is not None, [(r.status_code, r.text[:200]) for r in waiting[-3:]]
        assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
        # No client hung or got anything but a 200 or a retryable 503 with OpenAI error JSON ...
        failed = [r for _, _, r in replies if not (isinstance(r, httpx.Response) and r.status_code == 200)]
        failed += waiting
        bad = [r if isinstance(r, httpx.HTTPError) else (r.status_code, r.text[:300]) for r in failed]
        assert all(isinstance(r, httpx.Response) and _is_retryable_openai_error(r) for r in failed), bad
        # ... and requests in flight when the shard worker died got that 503.
        in_flight = [r for sent, done, r in replies if sent < died_at < done]
        assert any(isinstance(r, httpx.Response) and r.status_code == 503 for r in in_flight), in_flight
        # What answered is a new replica: Serve replaced the old one, whose new shard workers
        # (actors not seen before) took two of the surviving worker nodes.
        survivors = {node.node_id for node in cluster.worker_nodes} - {serve_node.node_id}
        again = [node for actor, (node, _) in _shard_workers().items() if actor not in shards]
        assert len(again) == 2 and again[0] != again[1], again
        assert lost not in again and set(again) <= survivors
    finally:
        serve.shutdown()
        cluster.remove_node(serve_node)
