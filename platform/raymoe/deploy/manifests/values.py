"""`DeployValues`: the one set of values every KubeRay manifest is rendered from.

Defaults describe a small mixed cluster (CPU workers, GPU workers that scale from zero, CPU
serving); `presets.py` derives the `cpu-dev` and `gpu-prod` overlays from them and
`planner_values.py` fills them from the capacity planner. Kubernetes quantities are strings in
Kubernetes' own notation ("500m", "16Gi"). Serve autoscaling defaults are Ray Serve's own
(`ray.serve.config.AutoscalingConfig`, Ray 2.60: upscale_delay_s 30, downscale_delay_s 600),
except `target_ongoing_requests`, which `serve_policy.py` derives from the engine's slots and
the TTFT SLO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from raymoe.config import require

# The Ray release the image carries (constraints.txt pins ray==2.60.0; the Dockerfile's base image
# has the same tag). KubeRay reads rayVersion to pick probe and auth behaviour.
RAY_VERSION = "2.60.0"
# Where the Dockerfile puts the repository (configs, shipped data); the Ray container's working
# directory, so the pipelines' relative config and data paths resolve as they do locally.
APP_DIR = "/opt/raymoe"
PIPELINES = ("ingest", "train", "finetune", "federated", "drift")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


def _check_name(name: str, key: str, max_len: int = 40) -> None:
    require(
        bool(_DNS1035.match(name)) and len(name) <= max_len,
        f"{key}={name!r}: expected a DNS-1035 label (lower-case letters, digits, '-'; starts "
        f"with a letter) of at most {max_len} characters",
    )


def _check_quantity(value: str, key: str) -> None:
    require(
        isinstance(value, str) and bool(_QUANTITY.match(value)),
        f"{key}={value!r}: expected a Kubernetes quantity string such as '500m', '4' or '16Gi'",
    )


@dataclass(kw_only=True)
class PodResources:
    """Requests = limits for one Ray container (Guaranteed QoS: Ray sizes itself from limits)."""

    cpu: str
    memory: str
    gpu: int = 0

    def __post_init__(self) -> None:
        _check_quantity(self.cpu, "cpu")
        _check_quantity(self.memory, "memory")
        require(self.gpu >= 0, f"gpu must be >= 0, got {self.gpu}")

    def num_cpus(self) -> int:
        """Whole CPUs Ray advertises for this pod (KubeRay rounds the limit up)."""
        if self.cpu.endswith("m"):
            return -(-int(self.cpu[:-1]) // 1000)
        return int(-(-float(self.cpu) // 1))


@dataclass(kw_only=True)
class WorkerGroupValues:
    """One KubeRay worker group: pods of one shape between min and max replicas."""

    name: str
    min_replicas: int = 0
    max_replicas: int
    resources: PodResources
    # Ray custom resources the group's nodes offer (e.g. {silo_code: 1} for a federated silo).
    ray_resources: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name(self.name, "worker_groups[].name", 30)
        require(
            0 <= self.min_replicas <= self.max_replicas,
            f"worker group {self.name}: need 0 <= min_replicas ({self.min_replicas}) <= "
            f"max_replicas ({self.max_replicas})",
        )


@dataclass(kw_only=True)
class AutoscalerValues:
    """KubeRay's in-tree Ray autoscaler (v2)."""

    # Seconds a worker node stays idle before the autoscaler removes it (KubeRay/Ray default 60).
    idle_timeout_s: int = 60
    # Default | Aggressive | Conservative (Conservative = upscaling_speed 1, the others unbounded).
    upscaling_mode: str = "Default"

    def __post_init__(self) -> None:
        require(self.idle_timeout_s >= 0, f"autoscaler.idle_timeout_s must be >= 0, got {self.idle_timeout_s}")
        require(
            self.upscaling_mode in ("Default", "Aggressive", "Conservative"),
            f"autoscaler.upscaling_mode must be Default, Aggressive or Conservative, got {self.upscaling_mode!r}",
        )


@dataclass(kw_only=True)
class GcsFaultToleranceValues:
    """GCS fault tolerance: the head's metadata in an external Redis, so a restarted head (and
    Serve's routing) survives. Off when `redis_address` is empty."""

    redis_address: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.redis_address)


@dataclass(kw_only=True)
class SecretValues:
    """Names of Secrets the cluster admin creates; manifests only reference them (never data)."""

    # key `api-key`: the OpenAI-compatible API key Serve checks.
    api_key: str = "raymoe-api-key"
    # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (any S3-compatible store; pyarrow reads them).
    object_store: str = "raymoe-object-store"
    # key `token`: a Grafana service-account token (Editor) for `raymoe dashboards push`.
    grafana_token: str = "raymoe-grafana"
    # key `password`: the Redis password for GCS fault tolerance.
    redis_password: str = "raymoe-redis"


@dataclass(kw_only=True)
class StorageValues:
    """The shared volume every pod mounts: data, checkpoints, artifacts, traffic windows."""

    claim_name: str = "raymoe-data"
    mount_path: str = "/mnt/raymoe"
    size: str = "200Gi"
    # ReadWriteMany: ingest, train, serve and drift pods on different nodes share the files.
    storage_class: str = ""

    def path(self, *parts: str) -> str:
        return "/".join([self.mount_path.rstrip("/"), *parts])


@dataclass(kw_only=True)
class JobValues:
    """One pipeline as a RayJob: `python -m pipelines.<name> --config CONFIG OVERRIDES...`."""

    config: str
    # Dotted overrides appended to the command line (the storage paths of this cluster).
    overrides: list[str] = field(default_factory=list)
    # Commands run after the pipeline succeeds (`&&`), e.g. exporting the trained model.
    then: list[list[str]] = field(default_factory=list)
    # Whole seconds the RayJob may run before KubeRay fails it (a hung job frees its cluster).
    active_deadline_s: int = 4 * 3600
    # New clusters KubeRay tries after a failed attempt (0 = fail once).
    backoff_limit: int = 0
    # Seconds a finished job's cluster is kept for `kubectl logs`/dashboard inspection.
    ttl_after_finished_s: int = 600


@dataclass(kw_only=True)
class ServeScalingValues:
    """Serve replica autoscaling and the numbers it is derived from (see serve_policy.py)."""

    min_replicas: int = 1
    max_replicas: int = 4
    # Ray Serve's AutoscalingConfig defaults (Ray 2.60, ray/serve/config.py).
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    # p99 time-to-first-token objective, seconds (raymoe.monitor.alerts.TTFT_P99_SLO_S).
    ttft_slo_s: float = 2.0
    # Expected seconds a request holds an engine slot, and its prefill time, at full batch
    # (from `bench.serve_load` or the capacity planner): the queue a replica may carry
    # before a new request's wait would break the SLO.
    request_s: float = 8.0
    prefill_s: float = 0.25

    def __post_init__(self) -> None:
        require(self.min_replicas >= 1, f"serve.scaling.min_replicas must be >= 1, got {self.min_replicas}")
        require(
            self.max_replicas >= self.min_replicas,
            f"serve.scaling.max_replicas={self.max_replicas} must be >= min_replicas={self.min_replicas}",
        )
        require(
            self.ttft_slo_s > 0 and self.request_s > 0 and self.prefill_s >= 0,
            "serve.scaling: ttft_slo_s and request_s must be > 0, prefill_s >= 0",
        )


@dataclass(kw_only=True)
class ServeValues:
    """The RayService: the Serve app's args (a `ServeConfig`) plus scaling and pod shape."""

    # `raymoe.serve.app:build_app` args, as in pipelines/configs/serve.debug.yaml's `app:`;
    # autoscaling is filled in from `scaling` (serve_policy.py), model_path is required.
    app: dict = field(
        default_factory=lambda: {
            "model_path": "/mnt/raymoe/models/train",
            "model_id": "raymoe",
            "num_cpus": 2.0,
            "max_ongoing_requests": 32,
            "max_queued_requests": 64,
            "backpressure_status": 503,
            "engine": {"num_slots": 8, "max_tokens_per_step": 256, "max_waiting": 64},
            "api_key_env": "RAYMOE_API_KEY",
            "traffic": {"enabled": True, "output_dir": "/mnt/raymoe/traffic"},
        }
    )
    scaling: ServeScalingValues = field(default_factory=ServeScalingValues)
    # One serving node: the pod shape of the RayService's worker group.
    worker: PodResources = field(default_factory=lambda: PodResources(cpu="4", memory="16Gi"))
    port: int = 8000

    def __post_init__(self) -> None:
        require(bool(self.app.get("model_path")), "serve.app.model_path must be set")


@dataclass(kw_only=True)
class MonitoringValues:
    """Prometheus operator and Grafana sidecar wiring (kube-prometheus-stack, as KubeRay's
    install/prometheus/install.sh deploys it: release `prometheus`, namespace `prometheus-system`)."""

    # The label kube-prometheus-stack's Prometheus selects PodMonitors/PrometheusRules by.
    prometheus_release: str = "prometheus"
    # The namespace Prometheus and Grafana run in (allowed to scrape the metrics ports).
    monitoring_namespace: str = "prometheus-system"
    grafana_url: str = "http://prometheus-grafana.prometheus-system.svc"
    scrape_interval: str = "30s"


@dataclass(kw_only=True)
class DeployValues:
    """Everything the manifests under k8s/ are rendered from."""

    name: str = "raymoe"
    namespace: str = "raymoe"
    # Where the KubeRay operator runs (its namespace may reach the head's dashboard).
    operator_namespace: str = "kuberay-system"
    image: str = "registry.example.com/raymoe:0.1.0"
    ray_version: str = RAY_VERSION
    head: PodResources = field(default_factory=lambda: PodResources(cpu="2", memory="8Gi"))
    worker_groups: list[WorkerGroupValues] = field(
        default_factory=lambda: [
            WorkerGroupValues(
                name="cpu", min_replicas=1, max_replicas=4, resources=PodResources(cpu="4", memory="16Gi")
            ),
            WorkerGroupValues(
                name="gpu", min_replicas=0, max_replicas=2, resources=PodResources(cpu="8", memory="64Gi", gpu=1)
            ),
        ]
    )
    # Federated silos: one worker group each, offering the `silo_<name>` resource only there.
    silos: list[str] = field(default_factory=lambda: ["code", "prose", "chat"])
    silo_resources: PodResources = field(default_factory=lambda: PodResources(cpu="2", memory="8Gi"))
    autoscaler: AutoscalerValues = field(default_factory=AutoscalerValues)
    gcs_ft: GcsFaultToleranceValues = field(default_factory=GcsFaultToleranceValues)
    secrets: SecretValues = field(default_factory=SecretValues)
    storage: StorageValues = field(default_factory=StorageValues)
    jobs: dict[str, JobValues] = field(default_factory=lambda: default_jobs(StorageValues()))
    # Cron schedule of the drift check (a CronJob creates the drift RayJob).
    drift_schedule: str = "0 * * * *"
    # Image with kubectl and bash for that CronJob (Kubernetes' own kubectl image).
    kubectl_image: str = "registry.k8s.io/kubectl:v1.34.1"
    serve: ServeValues = field(default_factory=ServeValues)
    monitoring: MonitoringValues = field(default_factory=MonitoringValues)

    def __post_init__(self) -> None:
        _check_name(self.name, "name", 20)
        _check_name(self.namespace, "namespace", 63)
        require(
            ":" in self.image.rsplit("/", 1)[-1] or "@sha256:" in self.image,
            f"image={self.image!r}: pin a tag or a digest",
        )
        names = [g.name for g in self.worker_groups] + [f"silo-{s}" for s in self.silos]
        require(len(names) == len(set(names)), f"worker group names must be unique, got {names}")
        for silo in self.silos:
            _check_name(f"silo-{silo}", "silos[]", 30)
        unknown = sorted(set(self.jobs) - set(PIPELINES))
        require(not unknown, f"jobs: unknown pipeline(s) {unknown}; known: {list(PIPELINES)}")


def default_jobs(storage: StorageValues) -> dict[str, JobValues]:
    """The pipelines as a chain on the shared volume: ingest -> train (+ export) -> finetune,
    federated (LoRA on the exported model) and drift (served traffic vs the oldest window).

    Outputs go under `storage.mount_path`: the image's own files are read-only there.
    """
    d = storage.path
    return {
        "ingest": JobValues(
            config="pipelines/configs/ingest.debug.yaml",
            overrides=[
                f"output_dir={d('data', 'ingest')}",
                # Rows of 128 + 1 tokens: the sequence length the train job trains at.
                "pack.seq_len=128",
            ],
            active_deadline_s=2 * 3600,
        ),
        "train": JobValues(
            config="pipelines/configs/train.debug.yaml",
            overrides=[
                f"data.path={d('data', 'ingest')}",
                f"checkpoint.uri={d('checkpoints', 'train')}",
                f"storage_path={d('ray-train')}",
                f"history_path={d('train', 'train-history.jsonl')}",
            ],
            # The Hugging Face artifact serving, fine-tuning and drift read.
            then=[["raymoe", "export", d("checkpoints", "train"), d("models", "train")]],
            active_deadline_s=12 * 3600,
            backoff_limit=1,
        ),
        "finetune": JobValues(
            config="pipelines/configs/finetune.debug.yaml",
            overrides=[f"base={d('models', 'train')}", f"output_dir={d('finetune')}", f"storage_path={d('ray-train')}"],
            active_deadline_s=6 * 3600,
            backoff_limit=1,
        ),
        "federated": JobValues(
            config="pipelines/configs/federated.debug.yaml",
            overrides=[f"base={d('models', 'train')}", f"output_dir={d('federated')}"],
            active_deadline_s=6 * 3600,
        ),
        "drift": JobValues(
            config="pipelines/configs/drift.debug.yaml",
            overrides=[
                f"current.dir={d('traffic')}",
                f"output_dir={d('drift')}",
                f"quality.artifact={d('models', 'train')}",
                # Gauges stay up one scrape interval after the check, then the job ends.
                "publish_metrics=true",
                "linger_s=60",
            ],
            active_deadline_s=3600,
        ),
    }
