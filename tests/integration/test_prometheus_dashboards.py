"""A real Prometheus scrapes the local Ray cluster while raymoe trains and serves; the dashboards'
queries are evaluated against it through Prometheus' HTTP API.

- Prometheus finds Ray's metrics ports through the service-discovery file Ray's dashboard writes
  into the session directory, so this module starts its own in-process cluster with the dashboard
  on (the shared `ray_cluster` fixture has none, hence no such file) and shuts it down at the end;
- metric values are read from Prometheus, not from the formatter: the step gauge reaches the run's
  last step, routed tokens per MoE layer add up to batch x seq_len x top-k, both expert-parallel
  ranks count all-to-all bytes, two checkpoints are observed; requests answered 200, TTFT
  observations and generated tokens cover what the load generator saw answered, and the tight KV
  budget preempts;
- every panel query of the Training, Serving and Experts dashboards returns a series once the
  template variables are substituted: `$cluster` by its "All" value `.*` (no `ray_io_cluster` label
  exists without KubeRay, and `=~".*"` matches a missing label), `$run` / `$model` by this run's
  values, a repeated panel's layer variable by one layer, `$__rate_interval` by 1m (Grafana's
  floor: four times the default 15 s scrape interval). Training panels are evaluated at the last
  moment Prometheus held all of the finished run's metrics (a worker's gauges leave Ray's exporter
  ~20 s after it exits), serving panels now, while the load runs;
- dashboards whose metrics come from jobs this module does not run are listed in NOT_COVERED.
"""

import math
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from raymoe.config import from_dict
from raymoe.monitor.dashboards import DASHBOARDS
from raymoe.monitor.dashboards.panels import Dashboard
from raymoe.train.config import TrainConfig

from tests.integration.prometheus_server import (
    PROMETHEUS, SKIP_REASON, PrometheusServer, ray_service_discovery_file,
)

pytestmark = pytest.mark.slow
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=SKIP_REASON)

CORPUS = str(Path(__file__).resolve().parents[2] / "data" / "corpus")
RUN = "promtrain"
STEPS = 6
SEQ_LEN, GLOBAL_BATCH = 64, 8
MODEL = "tiny-moe"
MAX_TOKENS = 24
MIN_REQUESTS = 10
RATE_INTERVAL = "1m"
WAIT_S = 90.0

# Which dashboard rows this module's runs feed ("train" or "serve"); every other dashboard is in
# NOT_COVERED with the reason.
COVERED = {
    "training": {"Progress": "train", "Throughput": "train", "Checkpoints": "train"},
    "serving": {"Traffic": "serve", "Latency": "serve", "Engine": "serve"},
    "experts": {"Training routing": "train", "Serving routing": "serve"},
}
NOT_COVERED = {
    "drift": "raymoe_drift_* and raymoe_quality_* are emitted by pipelines.drift (a drift-monitoring "
             "job over logged requests and a held-out set), which this module does not run.",
    "federated": "raymoe_federated_* are emitted by raymoe.federated.server during federated rounds, "
                 "which need one node per silo with a custom `silo_<name>` resource (a multi-node "
                 "ray.cluster_utils.Cluster, as in test_federated_cluster.py); this module's "
                 "single-node cluster has none.",
}
# The ingest counters (raymoe_ingest_*) are on no dashboard, so nothing here depends on them.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Its own single-node cluster with the dashboard on (it writes the service-discovery file)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the shared test cluster; the next module's `ray_cluster` starts it again
    ray.init(
        address="local",
        num_cpus=4,  # 2 cores: Train workers and the Serve replica ask for fractions
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def prom(cluster, tmp_path_factory):
    with PrometheusServer(ray_service_discovery_file(), tmp_path_factory.mktemp("prometheus")) as server:
        yield server


@pytest.fixture(scope="module")
def trained(prom, tmp_path_factory):
    """A 6-step ep=2 run on two Ray Train workers.

    Returns:
        The times (unix seconds, newest first) at which Prometheus held all of the run's final
        metrics.
    """
    from raymoe.train.loop import run_training

    tmp = tmp_path_factory.mktemp("train")
    cfg = from_dict(TrainConfig, {
        "name": RUN, "flavour": "debug", "steps": STEPS, "seed": 11,
        "layout": {"ep": 2, "dp": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "clip_norm": 1.0},
        "data": {"path": CORPUS, "seq_len": SEQ_LEN, "global_batch_size": GLOBAL_BATCH,
                 "cache_dir": str(tmp / "data-cache")},
        "checkpoint": {"uri": str(tmp / "ckpt"), "every_steps": 3},
        "num_cpus_per_worker": 0.5, "storage_path": str(tmp / "ray"), "log_every": 1,
        # Any positive peak makes rank 0 emit MFU (the panel is empty without it).
        "peak_tflops_per_worker": 1.0,
    })
    result = run_training(cfg)
    assert result.error is None, result.error
    assert result.metrics["step"] == STEPS
    # The moments (1 s apart) at which Prometheus held the final step together with both ranks'
    # all-to-all counters and the checkpoint histogram: each worker process flushes its own metrics,
    # and rank 0's gauges leave Ray's exporter ~20 s after the worker exits.
    complete = (f'(ray_raymoe_train_step{{run="{RUN}"}} == {STEPS})'
                f' and on () (count(ray_raymoe_train_all_to_all_bytes_total{{run="{RUN}"}}) == 2)'
                f' and on () ray_raymoe_train_checkpoint_seconds_count{{run="{RUN}"}}')
    samples = prom.wait_for(f"({complete})[10m:1s]", WAIT_S)
    return sorted({t for s in samples for t, _ in s["values"]}, reverse=True)


class Load:
    """Client threads sending completions (every other one streamed) until stopped."""

    def __init__(self, url: str, num_threads: int = 4):
        self.url, self.ok, self.other = url, 0, []
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(num_threads)]
        for t in self._threads:
            t.start()

    def _run(self, worker: int) -> None:
        import httpx

        with httpx.Client(timeout=120) as http:
            i = 0
            while not self._stop.is_set():
                # ignore_eos: every request generates exactly MAX_TOKENS tokens.
                body = {"model": MODEL, "prompt": f"request {worker} {i}", "max_tokens": MAX_TOKENS,
                        "temperature": 0, "ignore_eos": True, "stream": i % 2 == 1}
                r = http.post(f"{self.url}/v1/completions", json=body)
                with self._lock:
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.other.append((r.status_code, r.text[:200]))
                i += 1
                self._stop.wait(0.1)

    def answered(self) -> int:
        with self._lock:
            return self.ok

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


@pytest.fixture(scope="module")
def served(prom, tmp_path_factory):
    """The debug artifact on Serve with a KV budget too small for its 4 slots, under load; yields
    the load generator once it has seen MIN_REQUESTS answered."""
    from ray import serve

    from raymoe.serve.app import build_app
    from raymoe.serve.debug_artifact import make_debug_artifact

    artifact = make_debug_artifact(tmp_path_factory.mktemp("serve") / MODEL, seed=1)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    load = None
    try:
        # 12 blocks of 4 tokens hold 48 tokens; 4 running sequences of a ~5-token prompt + 24
        # tokens need ~116, so decodes run out of blocks and the newest sequence is preempted.
        serve.run(build_app({"model_path": str(artifact), "num_cpus": 0.25, "api_key_env": "",
                             "engine": {"num_slots": 4, "num_threads": 1, "block_size": 4,
                                        "num_kv_blocks": 12}}),
                  name="prom", route_prefix="/")
        load = Load(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + WAIT_S
        while load.answered() < MIN_REQUESTS and time.monotonic() < deadline:
            time.sleep(0.5)
        assert load.answered() >= MIN_REQUESTS, (load.answered(), load.other[:5])
        yield load
    finally:
        if load is not None:
            load.stop()
        serve.shutdown()


def _substitute(expr: str, layer: str = "0") -> str:
    """A panel query as Grafana sends it with All clusters, this module's run / model, one layer
    (what a repeated panel's copy holds) and the rate interval."""
    out = (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$cluster", ".*")
           .replace("$run", RUN).replace("$model", MODEL)
           .replace("$train_layer", layer).replace("$serve_layer", layer))
    assert "$" not in out, out
    return out


def _panel_queries(name: str, phase: str) -> list[tuple[str, str]]:
    """(panel title, query) of every target in the rows of dashboard `name` fed by `phase`."""
    dashboard: Dashboard = DASHBOARDS[name]
    return [(f"{name} / {row.title} / {panel.title}",
             _substitute(target.expr.replace("{filters}", dashboard.label_filter)))
            for row in dashboard.rows if COVERED[name][row.title] == phase
            for panel in row.panels for target in panel.targets]


def _empty_queries(prom, queries, at=None, deadline=None) -> list[tuple[str, str]]:
    """The queries that return no series (polled until `deadline`, monotonic seconds, if given)."""
    while True:
        empty = [(title, q) for title, q in queries if not prom.query(q, at=at)]
        if not empty or deadline is None or time.monotonic() > deadline:
            return empty
        time.sleep(1.0)


def test_every_dashboard_is_covered_here_or_listed_with_a_reason():
    assert set(COVERED) | set(NOT_COVERED) == set(DASHBOARDS)
    assert not set(COVERED) & set(NOT_COVERED)
    for name, rows in COVERED.items():
        assert set(rows) == {row.title for row in DASHBOARDS[name].rows}, name


@needs_prometheus
def test_cluster_all_value_matches_series_without_the_label(prom):
    # `up` is Prometheus' own series per scraped Ray target: no `ray_io_cluster` label locally.
    prom.wait_for('up{job="ray"} == 1', WAIT_S)
    assert prom.query('up{job="ray", ray_io_cluster=~".*"}')
    assert not prom.query('up{job="ray", ray_io_cluster=~".+"}')


@needs_prometheus
def test_training_metric_values_in_prometheus(prom, trained):
    at = trained[0]  # the newest moment the run's final metrics were all there
    step = prom.query(f'ray_raymoe_train_step{{run="{RUN}"}}', at=at)
    assert [s["value"] for s in step] == [STEPS]
    # Each MoE layer routes every token of the global batch to top-k = 2 experts, no capacity drop:
    # 8 sequences x 64 tokens x 2 = 1024 per layer; the debug flavour has 4 layers, the first dense.
    routed = prom.query(f'sum by (layer) (ray_raymoe_train_tokens_per_expert{{run="{RUN}"}})', at=at)
    assert {s["metric"]["layer"]: s["value"] for s in routed} == {
        str(layer): GLOBAL_BATCH * SEQ_LEN * 2 for layer in range(3)}
    experts = prom.query(f'count by (layer) (ray_raymoe_train_tokens_per_expert{{run="{RUN}"}})', at=at)
    assert {s["value"] for s in experts} == {8}
    sent = prom.query(f'sum by (rank) (ray_raymoe_train_all_to_all_bytes_total{{run="{RUN}"}})', at=at)
    assert sorted(s["metric"]["rank"] for s in sent) == ["0", "1"] and all(s["value"] > 0 for s in sent)
    # Checkpoints every 3 steps of 6: two writes observed by rank 0.
    count = prom.query(f'sum(ray_raymoe_train_checkpoint_seconds_count{{run="{RUN}"}})', at=at)
    assert [s["value"] for s in count] == [2]
    loss = prom.query(f'ray_raymoe_train_loss{{run="{RUN}"}}', at=at)
    # A fresh debug model predicts about uniformly over its 2048-token vocabulary: ln 2048 = 7.62.
    assert len(loss) == 1 and 0 < loss[0]["value"] < math.log(2048) + 1


@needs_prometheus
def test_training_panels_return_series(prom, trained):
    queries = _panel_queries("training", "train") + _panel_queries("experts", "train")
    # Each query at the moments the finished run's metrics were all in Prometheus, newest first
    # (how many samples a rate window caught around them depends on Ray's export timing).
    empty = queries
    for at in trained[:30]:
        empty = _empty_queries(prom, empty, at=at)
        if not empty:
            break
    assert not empty, "panel queries with no series:\n" + "\n".join(f"{t}: {q}" for t, q in empty)


@needs_prometheus
def test_serving_metric_values_in_prometheus(prom, served):
    n = served.answered()
    selector = f'model="{MODEL}", route="/v1/completions"'
    prom.wait_for(f'sum(ray_raymoe_serve_requests_total{{{selector}, status="200"}}) >= {n}', WAIT_S)
    prom.wait_for(f'sum(ray_raymoe_serve_ttft_seconds_count{{{selector}}}) >= {n}', WAIT_S)
    prom.wait_for(f'sum(ray_raymoe_serve_e2e_seconds_count{{{selector}}}) >= {n}', WAIT_S)
    # ignore_eos: every answered request generated exactly MAX_TOKENS tokens.
    prom.wait_for(f'sum(ray_raymoe_serve_generated_tokens_total{{model="{MODEL}"}}) >= {n * MAX_TOKENS}',
                  WAIT_S)
    prom.wait_for(f'sum(ray_raymoe_serve_preemptions_total{{model="{MODEL}"}}) > 0', WAIT_S)
    assert not served.other, served.other[:5]


@needs_prometheus
def test_serving_panels_return_series(prom, served):
    queries = _panel_queries("serving", "serve") + _panel_queries("experts", "serve")
    empty = _empty_queries(prom, queries, deadline=time.monotonic() + WAIT_S)
    assert not empty, "panel queries with no series:\n" + "\n".join(f"{t}: {q}" for t, q in empty)


@needs_prometheus
def test_variables_list_this_run_and_model(prom, trained, served):
    # `$cluster` reads `ray_io_cluster` on any series: without KubeRay no series has it, so the
    # variable lists nothing and only its "All" value (`.*`, used by the panel queries) remains.
    expected = {("training", "cluster"): [], ("training", "run"): [RUN],
                ("serving", "cluster"): [], ("serving", "model"): [MODEL],
                ("experts", "cluster"): [], ("experts", "run"): [RUN], ("experts", "model"): [MODEL],
                ("experts", "train_layer"): ["0", "1", "2"], ("experts", "serve_layer"): ["0", "1", "2", "3"]}
    got = {}
    for name in COVERED:
        for var in DASHBOARDS[name].variables:
            # Grafana's `label_values(selector, label)`, or `label_values(label)` over all series.
            match = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", _substitute(var.query()))
            values = prom.label_values(match.group(2), match.group(1))
            got[(name, var.name)] = sorted(values, key=lambda v: (len(v), v))
    assert got == expected
