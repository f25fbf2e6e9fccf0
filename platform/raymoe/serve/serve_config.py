"""The Serve application's config: `ServeConfig` (the `args` of `raymoe.serve.app:build_app`), its
autoscaling, and `ServeJobConfig` (`python -m pipelines.serve`: the app plus where HTTP listens);
the API key and LoRA adapter names a config points at.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from raymoe.config import (
    ConfigError,
    require,
    require_at_least,
    require_positive,
    require_resource,
    same_path,
)
from raymoe.precision import PRECISIONS
from raymoe.serve.engine import EngineConfig
from raymoe.serve.traffic_sampler import TrafficConfig


@dataclass(kw_only=True)
class AutoscalingConfig:
    """Ray Serve autoscaling of the replica count (one engine per replica)."""

    min_replicas: int = 1
    max_replicas: int = 1
    # Requests in flight per replica the autoscaler aims for; above it adds replicas.
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0

    def __post_init__(self) -> None:
        require(self.min_replicas >= 0, f"autoscaling.min_replicas must be >= 0, got {self.min_replicas}")
        require(
            self.max_replicas >= max(1, self.min_replicas),
            f"autoscaling.max_replicas={self.max_replicas} must be >= max(1, min_replicas={self.min_replicas})",
        )
        require_positive("autoscaling", self, "target_ongoing_requests")
        require_at_least("autoscaling", self, upscale_delay_s=0, downscale_delay_s=0)


@dataclass(kw_only=True)
class ServeConfig:
    """Everything `build_app` needs; `args` of the Serve application."""

    # An HF-format artifact directory (config.json, model.safetensors, tokenizer files).
    model_path: str
    # Name clients send as `model`; default: the artifact directory's name.
    model_id: str = ""
    engine: EngineConfig = field(default_factory=EngineConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    # Requests a replica works on at once; should cover engine.num_slots + engine.max_waiting.
    max_ongoing_requests: int = 32
    # Requests each replica queues beyond max_ongoing_requests before it refuses with
    # backpressure_status (OpenAI error JSON, Retry-After); -1 = unbounded.
    max_queued_requests: int = 64
    backpressure_status: Literal[429, 503] = 503
    retry_after_s: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # How often Serve probes a replica; a replica whose engine (thread, process or shard worker)
    # has died fails the probe and is restarted.
    health_check_period_s: float = 10.0
    # Expert-parallel shard workers per replica (Ray actors in a SPREAD placement group, joined by
    # a gloo/NCCL group); 1 = the model runs in the replica process.
    ep: int = 1
    # Logical experts given a second slot (EPLB) when ep > 1; num_experts + len(redundant_experts)
    # must split evenly over ep.
    redundant_experts: list[int] = field(default_factory=list)
    # Resources and torch threads of each shard worker (ep > 1); the replica keeps num_cpus/num_gpus.
    shard_num_cpus: float = 1.0
    shard_num_gpus: float = 0.0
    shard_num_threads: int = 0
    # Memory budget (GiB) of the process holding the weights (each shard worker with ep > 1, the
    # replica with ep = 1); 0 = none. A share of the model that does not fit is refused before any
    # tensor is read, naming the layout, the estimate and the limit; with ep > 1 Ray also reserves
    # it (`memory`) for each shard worker. The KV cache comes on top.
    memory_per_worker_gb: float = 0.0
    # Streamed SSE events sent per HTTP write after the first (which goes at once, for TTFT).
    # Every token stays its own OpenAI chunk; larger values cut per-write cost through the proxy.
    stream_interval: int = 1
    # Compute dtype of the weights, activations and KV cache: "auto" = bf16 where the device has
    # fast bf16 (AMX / AVX512-BF16 CPUs, bf16 CUDA devices), fp32 elsewhere; "fp32" / "bf16"
    # force either (`raymoe.precision`). Logged at start and the `dtype` label of
    # raymoe_serve_engine_info. Ignored with int8.
    dtype: str = "auto"
    # Weight-only INT8 (per-output-channel scales) for the linear layers and experts.
    int8: bool = False
    # Directory of peft-format LoRA adapters, one sub-directory per adapter name ("" = none).
    lora_dir: str = ""
    # The API key is read from this environment variable, else from `api_key_file`; none = open.
    api_key_env: str = "RAYMOE_API_KEY"
    api_key_file: str = ""
    # Sampled live traffic written as Parquet windows (prompt/output lengths, token histogram,
    # mean logprob, expert load, pooled embedding; text only with traffic.store_text).
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    name: str = "OpenAIServer"

    def __post_init__(self) -> None:
        require(bool(self.model_path), "model_path must be set (an HF-format artifact directory)")
        require(isinstance(self.ep, int) and self.ep >= 1, f"ep must be an integer >= 1, got {self.ep!r}")
        require(
            not self.redundant_experts or self.ep > 1,
            f"redundant_experts={self.redundant_experts} needs ep > 1 (got ep={self.ep})",
        )
        require(
            all(isinstance(e, int) and e >= 0 for e in self.redundant_experts),
            f"redundant_experts must be expert ids >= 0, got {self.redundant_experts}",
        )
        require(self.dtype in PRECISIONS, f"dtype must be one of {', '.join(PRECISIONS)}, got {self.dtype!r}")
        require(self.stream_interval >= 1, f"stream_interval must be >= 1, got {self.stream_interval}")
        require_positive("", self, "health_check_period_s")
        require(
            self.ep == 1 or not (self.int8 or self.lora_dir),
            f"ep={self.ep}: int8 and lora_dir are supported with ep=1 only",
        )
        require(self.shard_num_cpus > 0, f"shard_num_cpus must be > 0, got {self.shard_num_cpus!r}")
        require(self.shard_num_threads >= 0, f"shard_num_threads must be >= 0, got {self.shard_num_threads}")
        require(
            self.memory_per_worker_gb >= 0,
            f"memory_per_worker_gb must be >= 0 (0 = none), got {self.memory_per_worker_gb}",
        )
        require(not (self.int8 and self.num_gpus > 0), "int8 uses CPU int8 kernels; set num_gpus=0 or int8=false")
        require(self.max_ongoing_requests >= 1, f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        require(self.max_queued_requests >= -1, f"max_queued_requests must be >= -1, got {self.max_queued_requests}")
        require(self.retry_after_s >= 0, f"retry_after_s must be >= 0, got {self.retry_after_s}")
        # A replica needs some CPU; shard workers (ep > 1) too. GPUs are optional.
        require_resource("num_cpus", self.num_cpus)
        require(self.num_cpus > 0, f"num_cpus must be > 0, got {self.num_cpus!r}")
        require_resource("num_gpus", self.num_gpus, gpus=True)
        require_resource("shard_num_cpus", self.shard_num_cpus)
        require_resource("shard_num_gpus", self.shard_num_gpus, gpus=True)
        if not self.model_id:
            self.model_id = Path(self.model_path.rstrip("/")).name or "model"
        require(
            ":" not in self.model_id, f"model_id must not contain ':' (it separates adapters), got {self.model_id!r}"
        )


@dataclass(kw_only=True)
class HttpConfig:
    """Where Serve's HTTP proxy listens (used by `pipelines.serve`; `serve run` has its own flags)."""

    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        require(bool(self.host), "http.host must be set (an address to bind, e.g. 127.0.0.1)")
        require(0 < self.port < 65536, f"http.port must be in 1..65535, got {self.port}")


@dataclass(kw_only=True)
class ServeJobConfig:
    """`python -m pipelines.serve`: the application's args plus how to run it."""

    app: ServeConfig
    http: HttpConfig = field(default_factory=HttpConfig)
    app_name: str = "raymoe"
    route_prefix: str = "/"
    # The one path where a random-weight debug artifact may be written (debug configs only): when
    # app.model_path is this path and holds no artifact, the job writes one there first. Any
    # other app.model_path must hold an artifact already. "" = never write one.
    debug_artifact: str = ""
    # Keep serving until interrupted; false = deploy, answer one smoke request, shut down.
    block: bool = True

    def __post_init__(self) -> None:
        require(bool(self.app_name), "app_name must be set (the Serve application's name)")
        require(self.route_prefix.startswith("/"), f"route_prefix must start with '/', got {self.route_prefix!r}")

    @property
    def writes_debug_artifact(self) -> bool:
        """True when app.model_path is the debug config's own `debug_artifact` path."""
        return bool(self.debug_artifact) and same_path(self.app.model_path, self.debug_artifact)


def read_api_key(cfg: ServeConfig) -> str | None:
    """The API key from the environment variable, else the secret file; None = no auth."""
    key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
    if not key and cfg.api_key_file:
        path = Path(cfg.api_key_file)
        if not path.is_file():
            raise ConfigError(f"api_key_file {cfg.api_key_file!r} does not exist")
        key = path.read_text().strip()
    return key or None


def list_adapters(lora_dir: str) -> list[str]:
    """Adapter names: sub-directories of `lora_dir` holding an adapter_config.json."""
    if not lora_dir:
        return []
    root = Path(lora_dir)
    if not root.is_dir():
        raise ConfigError(f"lora_dir {lora_dir!r} is not a directory")
    return sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())


def check_port_free(host: str, port: int) -> None:
    """Raises ConfigError naming http.port when Serve's proxy could not bind `host:port`."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(
            f"http.port={port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "expected a free port and a local address"
        ) from None
