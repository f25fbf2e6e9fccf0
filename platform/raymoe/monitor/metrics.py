"""Every metric the platform exports, defined once: name, kind, description, tag keys.

Components emit through `ray_metric(SPEC)`; dashboards and alert rules are generated from or checked
against `REGISTRY`. Ray exports these on each node's metrics port with a `ray_` prefix, counters
also with a `_total` suffix (seen with Ray 2.60: `raymoe_ingest_records` ->
`ray_raymoe_ingest_records_total`), one series per worker process; `prometheus_name` gives the
exported name. Add new metrics here, as a constant plus an entry in `REGISTRY`; names are unique.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class MetricSpec:
    """One metric. `boundaries` only for histograms (upper bucket bounds, in the metric's unit)."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


# --- ingest (raymoe.data.ingest) -------------------------------------------------------------
INGEST_RECORDS = MetricSpec("raymoe_ingest_records", "counter", "Records read by the ingest pipeline.", ("source",))
INGEST_BYTES = MetricSpec("raymoe_ingest_bytes", "counter", "Raw input bytes read by the ingest pipeline.", ("source",))
INGEST_TOKENS = MetricSpec(
    "raymoe_ingest_tokens", "counter", "Tokens produced by the ingest tokenize stage.", ("split",)
)
INGEST_QUARANTINED = MetricSpec(
    "raymoe_ingest_quarantined", "counter", "Records or files sent to quarantine.", ("reason",)
)
INGEST_FILTERED = MetricSpec("raymoe_ingest_filtered", "counter", "Documents dropped by a quality filter.", ("reason",))
INGEST_DUPLICATES = MetricSpec("raymoe_ingest_duplicates", "counter", "Documents dropped as duplicates.", ("kind",))

# --- train (raymoe.train; emitted by Ray Train workers, rank 0 unless tagged by rank) ---------
TRAIN_STEP = MetricSpec("raymoe_train_step", "gauge", "Optimizer steps completed.", ("run",))
TRAIN_LOSS = MetricSpec(
    "raymoe_train_loss", "gauge", "Cross-entropy of the last step, mean over all workers.", ("run",)
)
TRAIN_TOKENS_PER_SECOND = MetricSpec(
    "raymoe_train_tokens_per_second", "gauge", "Training tokens per second, all workers.", ("run",)
)
TRAIN_MFU = MetricSpec(
    "raymoe_train_mfu",
    "gauge",
    "Model FLOPs utilisation: 6 * active params * tokens/s over the configured peak.",
    ("run",),
)
TRAIN_GRAD_NORM = MetricSpec("raymoe_train_grad_norm", "gauge", "Global gradient norm before clipping.", ("run",))
TRAIN_LR = MetricSpec("raymoe_train_lr", "gauge", "Learning rate of the last step.", ("run",))
TRAIN_PRECISION_INFO = MetricSpec(
    "raymoe_train_precision_info",
    "gauge",
    "1, labelled with the dtype the run computes in (train.precision resolved: fp32 or bf16).",
    ("run", "dtype"),
)
TRAIN_TOKENS_PER_EXPERT = MetricSpec(
    "raymoe_train_tokens_per_expert",
    "gauge",
    "Routed tokens per expert in the last step, summed over workers.",
    ("run", "layer", "expert"),
)
TRAIN_LOAD_IMBALANCE = MetricSpec(
    "raymoe_train_load_imbalance",
    "gauge",
    "Max over mean of tokens per expert in one MoE layer (1 = balanced).",
    ("run", "layer"),
)
TRAIN_ALL_TO_ALL_BYTES = MetricSpec(
    "raymoe_train_all_to_all_bytes",
    "counter",
    "Bytes a worker sent to its expert-parallel peers (forward dispatch + combine).",
    ("run", "rank"),
)
TRAIN_ALL_TO_ALL_SECONDS = MetricSpec(
    "raymoe_train_all_to_all_seconds", "counter", "Seconds a worker spent in forward all-to-alls.", ("run", "rank")
)
TRAIN_CHECKPOINT_SECONDS = MetricSpec(
    "raymoe_train_checkpoint_seconds",
    "histogram",
    "Seconds to write one sharded checkpoint.",
    ("run",),
    (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0),
)

TRAIN_METRICS: list[MetricSpec] = [
    TRAIN_STEP,
    TRAIN_LOSS,
    TRAIN_TOKENS_PER_SECOND,
    TRAIN_MFU,
    TRAIN_GRAD_NORM,
    TRAIN_LR,
    TRAIN_PRECISION_INFO,
    TRAIN_TOKENS_PER_EXPERT,
    TRAIN_LOAD_IMBALANCE,
    TRAIN_ALL_TO_ALL_BYTES,
    TRAIN_ALL_TO_ALL_SECONDS,
    TRAIN_CHECKPOINT_SECONDS,
]
# --- end train -------------------------------------------------------------------------------

# --- serve (raymoe.serve; emitted by Serve replicas) -----------------------------------------
_LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SERVE_REQUESTS = MetricSpec(
    "raymoe_serve_requests",
    "counter",
    "HTTP requests answered, by route and status code.",
    ("model", "route", "status"),
)
SERVE_TTFT_SECONDS = MetricSpec(
    "raymoe_serve_ttft_seconds",
    "histogram",
    "Time to first token, from request arrival.",
    ("model", "route"),
    _LATENCY_S,
)
SERVE_TPOT_SECONDS = MetricSpec(
    "raymoe_serve_tpot_seconds",
    "histogram",
    "Time per output token after the first.",
    ("model", "route"),
    (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
SERVE_E2E_SECONDS = MetricSpec(
    "raymoe_serve_e2e_seconds", "histogram", "End-to-end request latency.", ("model", "route"), _LATENCY_S
)
SERVE_RUNNING_SEQS = MetricSpec(
    "raymoe_serve_running_seqs", "gauge", "Sequences in the engine's running batch.", ("model",)
)
SERVE_WAITING_SEQS = MetricSpec("raymoe_serve_waiting_seqs", "gauge", "Sequences waiting for a KV slot.", ("model",))
SERVE_KV_CACHE_USAGE = MetricSpec(
    "raymoe_serve_kv_cache_usage", "gauge", "Fraction of the KV block budget in use (0..1).", ("model",)
)
SERVE_BATCH_SIZE = MetricSpec("raymoe_serve_batch_size", "gauge", "Sequences in the last engine step.", ("model",))
SERVE_GENERATED_TOKENS = MetricSpec("raymoe_serve_generated_tokens", "counter", "Output tokens generated.", ("model",))
SERVE_PREEMPTIONS = MetricSpec(
    "raymoe_serve_preemptions", "counter", "Sequences preempted (KV budget full, recomputed).", ("model",)
)
SERVE_TOKENS_PER_EXPERT = MetricSpec(
    "raymoe_serve_tokens_per_expert", "counter", "Routed tokens per expert per MoE layer.", ("model", "layer", "expert")
)

SERVE_EXPERT_COPIES = MetricSpec(
    "raymoe_serve_expert_copies",
    "gauge",
    "Physical copies of each logical expert in a replica's expert placement (1 = no redundant "
    "copy; the same placement for every MoE layer).",
    ("model", "expert"),
)

SERVE_ENGINE_INFO = MetricSpec(
    "raymoe_serve_engine_info",
    "gauge",
    "1 per replica engine, labelled with its compute dtype (the config's dtype resolved: fp32, bf16, "
    "or int8 for INT8 weights).",
    ("model", "dtype"),
)

SERVE_METRICS: list[MetricSpec] = [
    SERVE_REQUESTS,
    SERVE_TTFT_SECONDS,
    SERVE_TPOT_SECONDS,
    SERVE_E2E_SECONDS,
    SERVE_RUNNING_SEQS,
    SERVE_WAITING_SEQS,
    SERVE_KV_CACHE_USAGE,
    SERVE_BATCH_SIZE,
    SERVE_GENERATED_TOKENS,
    SERVE_PREEMPTIONS,
    SERVE_TOKENS_PER_EXPERT,
    SERVE_EXPERT_COPIES,
    SERVE_ENGINE_INFO,
]
# --- end serve -------------------------------------------------------------------------------

# --- fine-tune / federated (raymoe.train.finetune, raymoe.federated.server) -------------------
FINETUNE_STEP = MetricSpec("raymoe_finetune_step", "gauge", "LoRA fine-tuning optimizer steps completed.", ("run",))
FINETUNE_LOSS = MetricSpec(
    "raymoe_finetune_loss", "gauge", "Answer-token cross-entropy of the last fine-tuning step.", ("run",)
)
FINETUNE_TOKENS_PER_SECOND = MetricSpec(
    "raymoe_finetune_tokens_per_second",
    "gauge",
    "Fine-tuning input tokens (padding excluded) per second, all workers.",
    ("run",),
)
FEDERATED_ROUND = MetricSpec("raymoe_federated_round", "gauge", "Federated rounds completed.", ("run",))
FEDERATED_PARTICIPANTS = MetricSpec(
    "raymoe_federated_participants", "gauge", "Silos whose update was aggregated in the last round.", ("run",)
)
FEDERATED_REJECTED_UPDATES = MetricSpec(
    "raymoe_federated_rejected_updates",
    "counter",
    "Silo updates rejected (non_finite, wrong_shape, norm_exceeded, ...), failed or late.",
    ("run", "reason"),
)
FEDERATED_UPDATE_NORM = MetricSpec(
    "raymoe_federated_update_norm",
    "histogram",
    "L2 norm of a silo's adapter update (before clipping).",
    ("run",),
    (0.001, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0),
)
FEDERATED_EVAL_LOSS = MetricSpec(
    "raymoe_federated_eval_loss", "gauge", "Held-out answer loss of the global adapter after a round.", ("run",)
)
FEDERATED_EPSILON = MetricSpec(
    "raymoe_federated_epsilon", "gauge", "Differential-privacy epsilon spent so far (at the run's delta).", ("run",)
)

FEDERATED_METRICS: list[MetricSpec] = [
    FINETUNE_STEP,
    FINETUNE_LOSS,
    FINETUNE_TOKENS_PER_SECOND,
    FEDERATED_ROUND,
    FEDERATED_PARTICIPANTS,
    FEDERATED_REJECTED_UPDATES,
    FEDERATED_UPDATE_NORM,
    FEDERATED_EVAL_LOSS,
    FEDERATED_EPSILON,
]
# --- end fine-tune / federated ---------------------------------------------------------------

# --- drift and quality (pipelines.drift) ------------------------------------------------------
DRIFT_SCORE = MetricSpec(
    "raymoe_drift_score",
    "gauge",
    "Drift statistic of the last check (PSI, chi-square, KS, Wasserstein, Jensen-Shannon, MMD).",
    ("run", "detector", "feature"),
)
DRIFT_THRESHOLD = MetricSpec(
    "raymoe_drift_threshold",
    "gauge",
    "The configured alarm threshold of a drift detector.",
    ("run", "detector", "feature"),
)
DRIFT_ALARM = MetricSpec(
    "raymoe_drift_alarm",
    "gauge",
    "1 when the feature's detector is over its threshold, else 0.",
    ("run", "detector", "feature"),
)
DRIFT_P_VALUE = MetricSpec(
    "raymoe_drift_p_value",
    "gauge",
    "p-value of the last check for test detectors (chi-square, KS, MMD); alarm when below the threshold.",
    ("run", "detector", "feature"),
)
QUALITY_PERPLEXITY = MetricSpec(
    "raymoe_quality_perplexity",
    "gauge",
    "Held-out perplexity of the served model on the fixed eval set.",
    ("run", "model"),
)
QUALITY_DECAY = MetricSpec(
    "raymoe_quality_decay",
    "gauge",
    "Held-out perplexity over the first recorded point (1 = no decay).",
    ("run", "model"),
)

DRIFT_METRICS: list[MetricSpec] = [
    DRIFT_SCORE,
    DRIFT_THRESHOLD,
    DRIFT_ALARM,
    DRIFT_P_VALUE,
    QUALITY_PERPLEXITY,
    QUALITY_DECAY,
]
# --- end drift --------------------------------------------------------------------------------

REGISTRY: list[MetricSpec] = [
    INGEST_RECORDS,
    INGEST_BYTES,
    INGEST_TOKENS,
    INGEST_QUARANTINED,
    INGEST_FILTERED,
    INGEST_DUPLICATES,
    *TRAIN_METRICS,
    *SERVE_METRICS,
    *FEDERATED_METRICS,
    *DRIFT_METRICS,
]

_instances: dict[str, Any] = {}
_instances_job: list[str] = [""]  # the Ray job the instances were made in

# Ray's metrics agent stops exporting a process's metrics once that process has reported nothing
# for RAY_WORKER_TIMEOUT_S (120 s by default, `ray/_private/metrics_agent.py`), so a gauge set once
# by a job that then waits (a long federated round, the drift job between checks) vanished from
# Prometheus two minutes later (measured). Gauges made by `ray_metric` remember their last value
# per tag set, and a daemon thread of the process sets them again every GAUGE_REFRESH_S. Counters
# and histograms cannot be re-reported without changing them; their series pause instead.
GAUGE_REFRESH_S = 30.0


class KeptGauge:
    """A `ray.util.metrics.Gauge` whose last values are set again every GAUGE_REFRESH_S."""

    def __init__(self, gauge: Any):
        self._gauge = gauge
        self._last: dict[tuple[tuple[str, str], ...], float] = {}
        self._lock = threading.Lock()

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._gauge.set(value, tags=tags)
        with self._lock:
            self._last[tuple(sorted((tags or {}).items()))] = value

    def refresh(self) -> None:
        with self._lock:
            last = list(self._last.items())
        for tags, value in last:
            self._gauge.set(value, tags=dict(tags))


def _refresh_gauges_forever() -> None:
    while True:
        time.sleep(GAUGE_REFRESH_S)
        for metric in list(_instances.values()):
            if isinstance(metric, KeptGauge):
                with contextlib.suppress(Exception):  # e.g. Ray shut down under us; try again later
                    metric.refresh()


_refresher: list[threading.Thread] = []  # the process's one refresh thread, once a gauge exists


def _start_refresher() -> None:
    if not _refresher:
        _refresher.append(threading.Thread(target=_refresh_gauges_forever, name="raymoe-gauges", daemon=True))
        _refresher[0].start()


def _current_job() -> str:
    """This process's Ray job on its node ("" without Ray): job ids restart at 1 in each new
    cluster, node ids differ between clusters."""
    import ray

    if not ray.is_initialized():
        return ""
    context = ray.get_runtime_context()
    return f"{context.get_node_id()}:{context.get_job_id()}"


def prometheus_name(spec: MetricSpec) -> str:
    """The series name Prometheus scrapes for `spec` from a Ray metrics port (histograms add
    `_bucket`, `_sum` and `_count` to it)."""
    return f"ray_{spec.name}_total" if spec.kind == "counter" else f"ray_{spec.name}"


def ray_metric(spec: MetricSpec) -> Any:
    """The `ray.util.metrics` object for `spec`, created once per process.

    Only call where Ray is initialised (a driver after `ray.init`, a task, an actor).
    """
    # A process that joins another cluster (a new driver job) starts with fresh metrics: the
    # gauges kept for the previous one must not be re-published into the new one.
    job = _current_job()
    if job != _instances_job[0]:
        _instances.clear()
        _instances_job[0] = job
    if spec.name not in _instances:
        from ray.util import metrics  # imported here: this module is read without Ray too

        metric: metrics.Counter | KeptGauge | metrics.Histogram
        if spec.kind == "counter":
            metric = metrics.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
        elif spec.kind == "gauge":
            metric = KeptGauge(metrics.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys))
            _start_refresher()
        else:
            metric = metrics.Histogram(spec.name, spec.description, list(spec.boundaries), tag_keys=spec.tag_keys)
        _instances[spec.name] = metric
    return _instances[spec.name]
