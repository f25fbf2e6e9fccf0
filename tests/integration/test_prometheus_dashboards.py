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
- federated runs (three silos on this node's `silo_<name>` resources, one silo killed in round 2;
  then a DP round) put rounds, participants, a `failed` rejection, update norms and epsilon in
  Prometheus; a drift check with --eval over the served app's sampled traffic windows puts every
  detector's score, threshold, alarm and p-value and the held-out perplexity there;
- every panel query of every dashboard returns a series once the template variables are
  substituted: `$cluster` by its "All" value `.*` (no `ray_io_cluster` label exists without
  KubeRay, and `=~".*"` matches a missing label), `$run` / `$model` by the values of the run
  feeding the dashboard, a repeated panel's layer variable by one layer, `$__rate_interval` by 1m
  (Grafana's floor: four times the default 15 s scrape interval). Training panels are evaluated at the last
  moment Prometheus held all of the finished run's metrics (a worker's gauges leave Ray's exporter
  ~20 s after it exits), the others now (the load still runs; federated and drift gauges are
  this driver's and stay);
- a dashboard whose metrics came from a job this module does not run would be listed in
  NOT_COVERED with the reason (none is).
"""

import json
import math
import re
import threading
import time
from pathlib import Path

import pytest

from raymoe.config import from_dict
from raymoe.monitor.dashboards import DASHBOARDS
from raymoe.monitor.dashboards.panels import Dashboard
from raymoe.train.config import TrainConfig
from tests.integration import local_processes
from tests.integration.local_processes import free_port as _free_port
from tests.integration.prometheus_server import (
    PROMETHEUS,
    SKIP_REASON,
    PrometheusServer,
    ray_service_discovery_file,
)

pytestmark = pytest.mark.slow
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=SKIP_REASON)

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
    "drift": {"Drift": "drift", "Quality": "drift"},
    "federated": {"Rounds": "federated", "Updates, quality and privacy": "federated"},
}
NOT_COVERED: dict[str, str] = {}
# The ingest counters (raymoe_ingest_*) are on no dashboard, so nothing here depends on them.


@pytest.fixture(scope="module")
def cluster():
    """Its own single-node cluster with the dashboard on (it writes the service-discovery file)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the shared test cluster; the next module's `ray_cluster` starts it again
    with local_processes.own_agent_port():
        ray.init(
            address="local",
            num_cpus=4,  # 2 cores: Train workers and the Serve replica ask for fractions
            # The federated silos' resources, all on this one node (each silo still gets its own actor).
            resources={f"silo_{name}": 1 for name in SILOS},
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=_free_port(),  # not 8265, which another module's cluster may hold
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}},
            # Processes report their metrics to the agent every 2 s instead of Ray's 10 s: each
            # fixture below waits for its run's final values to reach Prometheus.
            _system_config={"metrics_report_interval_ms": 2000},
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
    from tests.integration.corpus_ingest import ingest_corpus

    tmp = tmp_path_factory.mktemp("train")
    cfg = from_dict(
        TrainConfig,
        {
            "name": RUN,
            "flavour": "debug",
            "steps": STEPS,
            "seed": 11,
            "layout": {"ep": 2, "dp": 1},
            "optim": {"lr": 3e-3, "warmup_steps": 0, "clip_norm": 1.0},
            "data": {
                "path": ingest_corpus(tmp / "ingest", seq_len=SEQ_LEN),
                "seq_len": SEQ_LEN,
                "global_batch_size": GLOBAL_BATCH,
            },
            "checkpoint": {"uri": str(tmp / "ckpt"), "every_steps": 3},
            "num_cpus_per_worker": 0.5,
            "storage_path": str(tmp / "ray"),
            "log_every": 1,
            # Any positive peak makes rank 0 emit MFU (the panel is empty without it).
            "peak_tflops_per_worker": 1.0,
            "history_path": str(tmp / "train-history.jsonl"),
        },
    )
    result = run_training(cfg)
    assert result.error is None, result.error
    assert result.metrics["step"] == STEPS
    # The history `raymoe report` plots: one line per step (log_every 1), each MoE layer routing
    # 8 sequences x 64 tokens to top-2 experts.
    history = [json.loads(line) for line in (tmp / "train-history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    assert all(sum(layer) == GLOBAL_BATCH * SEQ_LEN * 2 for h in history for layer in h["tokens_per_expert"])
    from raymoe.monitor.run_report import write_run_report

    written = {p.name for p in write_run_report(tmp, tmp / "report")}
    assert {"loss.png", "tokens_per_s.png", "expert_load.png"} <= written
    # The moments (1 s apart) at which Prometheus held the final step together with both ranks'
    # all-to-all counters and the checkpoint histogram: each worker process flushes its own metrics,
    # and rank 0's gauges leave Ray's exporter ~20 s after the worker exits.
    complete = (
        f'(ray_raymoe_train_step{{run="{RUN}"}} == {STEPS})'
        f' and on () (count(ray_raymoe_train_all_to_all_bytes_total{{run="{RUN}"}}) == 2)'
        f' and on () ray_raymoe_train_checkpoint_seconds_count{{run="{RUN}"}}'
    )
    samples = prom.wait_for(f"({complete})[10m:1s]", WAIT_S)
    return sorted({t for s in samples for t, _ in s["values"]}, reverse=True)


SILOS = ("code", "prose", "chat")
FED_RUN = "promfed"
FED_DP_RUN = "promfed-dp"
FED_ROUNDS = 2


@pytest.fixture(scope="module")
def federated(prom, tmp_path_factory):
    """Two plain rounds over three silos, the chat silo's actor killed as round 2 starts (its
    update is rejected, reason `failed`), then one clipped and noised round (the server observes
    no per-silo norm under DP, so the norm and epsilon panels need one run each). Returns the
    plain run's summary and the DP run's."""
    import ray

    from raymoe.federated.config import FederatedConfig
    from raymoe.federated.job import run_federated
    from raymoe.serve.debug_artifact import make_debug_artifact

    sft = Path(__file__).resolve().parents[2] / "data" / "sft" / "silos"
    tmp = tmp_path_factory.mktemp("federated")
    texts = [line for line in (sft / "heldout.jsonl").read_text().splitlines() if line.strip()]
    base = make_debug_artifact(
        tmp / "base", seed=0, vocab_size=512, corpus=texts, dim=64, num_layers=2, max_seq_len=256
    )

    def cfg(name, rounds, **over):
        return from_dict(
            FederatedConfig,
            {
                "name": name,
                "base": str(base),
                "eval_path": str(sft / "heldout.jsonl"),
                "rounds": rounds,
                "local_steps": 2,
                "local_batch_size": 4,
                "seed": 3,
                "output_dir": str(tmp / name),
                "silos": [{"name": n, "data_path": str(sft / n / "train.jsonl")} for n in SILOS],
                "lora": {"rank": 4, "alpha": 8},
                "optim": {"lr": 3e-3, "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0},
                "num_cpus_per_silo": 0.25,
                "faults": {"round_deadline_s": 120, "quorum": 2},
                **over,
            },
        )

    def kill_chat(round, selected):
        if round == 2:
            ray.kill(ray.get_actor(f"{FED_RUN}-silo-chat"))

    plain = run_federated(cfg(FED_RUN, FED_ROUNDS), on_round_start=kill_chat)
    dp = run_federated(cfg(FED_DP_RUN, 1, privacy={"clip_norm": 0.5, "noise_multiplier": 1.0}))
    assert plain["rounds"] == FED_ROUNDS and dp["rounds"] == 1
    return plain, dp


class Load:
    """Client threads sending completions (every other one streamed) until stopped."""

    def __init__(self, url: str, num_threads: int = 4):
        self.url, self.ok = url, 0
        self.other: list[tuple[int, str]] = []  # (status, body start) of every failed request
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
                body = {
                    "model": MODEL,
                    "prompt": f"request {worker} {i}",
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": i % 2 == 1,
                }
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
    traffic = artifact.parent / "traffic"
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    load = None
    try:
        # 12 blocks of 4 tokens hold 48 tokens; 4 running sequences of a ~5-token prompt + 24
        # tokens need ~116, so decodes run out of blocks and the newest sequence is preempted.
        serve.run(
            build_app(
                {
                    "model_path": str(artifact),
                    "num_cpus": 0.25,
                    "api_key_env": "",
                    "engine": {"num_slots": 4, "num_threads": 1, "block_size": 4, "num_kv_blocks": 12},
                    # Sampled traffic for the drift job: a window per 8 requests.
                    "traffic": {"enabled": True, "output_dir": str(traffic), "window_requests": 8},
                }
            ),
            name="prom",
            route_prefix="/",
        )
        load = Load(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + WAIT_S
        while load.answered() < MIN_REQUESTS and time.monotonic() < deadline:
            time.sleep(0.5)
        assert load.answered() >= MIN_REQUESTS, (load.answered(), load.other[:5])
        load.artifact, load.traffic = artifact, traffic
        yield load
    finally:
        if load is not None:
            load.stop()
        serve.shutdown()


DRIFT_RUN = "promdrift"


@pytest.fixture(scope="module")
def drift_checked(served, tmp_path_factory):
    """One drift check (with --eval) of the served app's sampled traffic, from this process (a
    driver of the cluster, so its gauges reach Prometheus). Returns the quality point."""
    from pipelines.drift import check_once
    from raymoe.monitor.drift_job_config import DriftJobConfig
    from raymoe.monitor.traffic_windows import list_windows

    deadline = time.monotonic() + WAIT_S
    while len(list_windows(served.traffic)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    out = tmp_path_factory.mktemp("drift")
    cfg = from_dict(
        DriftJobConfig,
        {
            "name": DRIFT_RUN,
            "output_dir": str(out),
            "current": {"dir": str(served.traffic)},
            "quality": {"artifact": str(served.artifact), "max_new_tokens": 0},
        },
    )
    check_once(cfg, evaluate=True)
    assert (out / "report.html").is_file()
    return [json.loads(line) for line in (out / "quality-history.jsonl").read_text().splitlines()]


def _substitute(expr: str, layer: str = "0", run: str = RUN) -> str:
    """A panel query as Grafana sends it with All clusters, this module's run / model, one layer
    (what a repeated panel's copy holds) and the rate interval."""
    out = (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$cluster", ".*")
        .replace("$run", run)
        .replace("$model", MODEL)
        .replace("$train_layer", layer)
        .replace("$serve_layer", layer)
    )
    assert "$" not in out, out
    return out


def _panel_queries(name: str, phase: str, run: str = RUN) -> list[tuple[str, str]]:
    """(panel title, query) of every target in the rows of dashboard `name` fed by `phase`."""
    dashboard: Dashboard = DASHBOARDS[name]
    return [
        (
            f"{name} / {row.title} / {panel.title}",
            _substitute(target.expr.replace("{filters}", dashboard.label_filter), run=run),
        )
        for row in dashboard.rows
        if COVERED[name][row.title] == phase
        for panel in row.panels
        for target in panel.targets
    ]


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
        str(layer): GLOBAL_BATCH * SEQ_LEN * 2 for layer in range(3)
    }
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
    prom.wait_for(f"sum(ray_raymoe_serve_ttft_seconds_count{{{selector}}}) >= {n}", WAIT_S)
    prom.wait_for(f"sum(ray_raymoe_serve_e2e_seconds_count{{{selector}}}) >= {n}", WAIT_S)
    # ignore_eos: every answered request generated exactly MAX_TOKENS tokens.
    prom.wait_for(f'sum(ray_raymoe_serve_generated_tokens_total{{model="{MODEL}"}}) >= {n * MAX_TOKENS}', WAIT_S)
    prom.wait_for(f'sum(ray_raymoe_serve_preemptions_total{{model="{MODEL}"}}) > 0', WAIT_S)
    # ep=1: one copy of each of the debug model's 8 experts.
    copies = prom.wait_for(f'ray_raymoe_serve_expert_copies{{model="{MODEL}"}}', WAIT_S)
    assert sorted(int(c["metric"]["expert"]) for c in copies) == list(range(8))
    assert {c["value"] for c in copies} == {1}
    assert not served.other, served.other[:5]


@needs_prometheus
def test_serving_panels_return_series(prom, served):
    queries = _panel_queries("serving", "serve") + _panel_queries("experts", "serve")
    empty = _empty_queries(prom, queries, deadline=time.monotonic() + WAIT_S)
    assert not empty, "panel queries with no series:\n" + "\n".join(f"{t}: {q}" for t, q in empty)


@needs_prometheus
def test_federated_metric_values_in_prometheus(prom, federated):
    plain, dp = federated
    run = f'run="{FED_RUN}"'
    prom.wait_for(f"ray_raymoe_federated_round{{{run}}} == {FED_ROUNDS}", WAIT_S)
    # Round 2 aggregated the two live silos; the killed one is counted as failed.
    last = plain["history"][-1]
    assert sorted(last["participants"]) == ["code", "prose"]
    prom.wait_for(f"ray_raymoe_federated_participants{{{run}}} == 2", WAIT_S)
    prom.wait_for(f'sum(ray_raymoe_federated_rejected_updates_total{{{run}, reason="failed"}}) >= 1', WAIT_S)
    # One norm observed per aggregated update: 3 in round 1, 2 in round 2.
    norms = prom.wait_for(f"sum(ray_raymoe_federated_update_norm_count{{{run}}})", WAIT_S)
    assert norms[0]["value"] == 5, norms
    eps = prom.wait_for(f'ray_raymoe_federated_epsilon{{run="{FED_DP_RUN}"}}', WAIT_S)
    assert eps[0]["value"] == pytest.approx(dp["history"][-1]["epsilon"], rel=1e-6)


@needs_prometheus
def test_federated_panels_return_series(prom, federated):
    # Both runs selected, as Grafana writes a multi-value variable into a regex.
    queries = _panel_queries("federated", "federated", run=f"{FED_RUN}|{FED_DP_RUN}")
    empty = _empty_queries(prom, queries, deadline=time.monotonic() + WAIT_S)
    assert not empty, "panel queries with no series:\n" + "\n".join(f"{t}: {q}" for t, q in empty)


@needs_prometheus
def test_drift_metric_values_in_prometheus(prom, drift_checked):
    run = f'run="{DRIFT_RUN}"'
    # Every (feature, detector) of the check has a score, a threshold and an alarm; tests a p-value.
    alarms = prom.wait_for(f"ray_raymoe_drift_alarm{{{run}}}", WAIT_S, check=lambda series: len(series) >= 10)
    assert {s["metric"]["feature"] for s in alarms} >= {
        "prompt_length",
        "token_histogram",
        "expert_load",
        "embedding",
        "mean_logprob",
    }
    p_values = prom.wait_for(f"ray_raymoe_drift_p_value{{{run}}}", WAIT_S)
    assert {s["metric"]["detector"] for s in p_values} <= {"chi2", "ks", "mmd"}
    ppl = prom.wait_for(f'ray_raymoe_quality_perplexity{{{run}, model="{MODEL}"}}', WAIT_S)
    assert ppl[0]["value"] == pytest.approx(drift_checked[-1]["perplexity"], rel=1e-6)
    decay = prom.wait_for(f'ray_raymoe_quality_decay{{{run}, model="{MODEL}"}}', WAIT_S)
    assert decay[0]["value"] == 1.0  # the first point is its own baseline


@needs_prometheus
def test_drift_panels_return_series(prom, drift_checked):
    queries = _panel_queries("drift", "drift", run=DRIFT_RUN)
    empty = _empty_queries(prom, queries, deadline=time.monotonic() + WAIT_S)
    assert not empty, "panel queries with no series:\n" + "\n".join(f"{t}: {q}" for t, q in empty)


@needs_prometheus
def test_variables_list_this_run_and_model(prom, trained, served, federated, drift_checked):
    # `$cluster` reads `ray_io_cluster` on any series: without KubeRay no series has it, so the
    # variable lists nothing and only its "All" value (`.*`, used by the panel queries) remains.
    expected = {
        ("training", "cluster"): [],
        ("training", "run"): [RUN],
        ("serving", "cluster"): [],
        ("serving", "model"): [MODEL],
        ("experts", "cluster"): [],
        ("experts", "run"): [RUN],
        ("experts", "model"): [MODEL],
        ("experts", "train_layer"): ["0", "1", "2"],
        ("experts", "serve_layer"): ["0", "1", "2", "3"],
        ("federated", "cluster"): [],
        ("federated", "run"): [FED_RUN, FED_DP_RUN],
        ("drift", "cluster"): [],
        ("drift", "run"): [DRIFT_RUN],
        ("drift", "model"): [MODEL],
    }
    # The federated and drift gauges are this driver's: polled until their first scrape.
    deadline = time.monotonic() + WAIT_S
    while True:
        got = {}
        for name in COVERED:
            for var in DASHBOARDS[name].variables:
                # Grafana's `label_values(selector, label)`, or `label_values(label)` over all series.
                match = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", _substitute(var.query()))
                values = prom.label_values(match.group(2), match.group(1))
                got[(name, var.name)] = sorted(values, key=lambda v: (len(v), v))
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert got == expected
