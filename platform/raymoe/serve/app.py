"""The Ray Serve application: `build_app(args)` -> one FastAPI ingress deployment over an engine.

Usable as `serve run raymoe.serve.app:build_app model_path=/path/to/artifact`, from a Serve config
file / RayService `serveConfigV2` (`import_path: raymoe.serve.app:build_app`, `args: {...}`), and
from `python -m pipelines.serve`. `args` is a `ServeConfig` (`raymoe.serve.serve_config`) as plain
data; unknown keys fail with the key named, before any replica starts.

Backpressure: each replica runs `max_ongoing_requests` at once (the engine batches them) and
queues up to `max_queued_requests` more; beyond that it answers `backpressure_status` (429 or 503)
at once, as OpenAI error JSON with Retry-After (`raymoe.serve.admission`: Serve's own refusal has a
plain-text body). The engine's own waiting queue (`engine.max_waiting`) answers 429.

Traffic sampling (`traffic`, off by default): each replica writes sampled requests' features as
Parquet windows for the drift job (`raymoe.serve.traffic_sampler`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

from raymoe.config import ConfigError, from_dict, to_dict
from raymoe.precision import Precision
from raymoe.serve.engine import EngineCore
from raymoe.serve.serve_config import ServeConfig, list_adapters, read_api_key

log = logging.getLogger(__name__)


def check_expert_slots(cfg: ServeConfig) -> None:
    """With the artifact readable here, fails before any replica starts when the expert slots
    (num_experts + len(redundant_experts)) do not split evenly over ep, or when one worker's share
    does not fit `memory_per_worker_gb`. A path only the cluster can read is checked when the
    shard workers start."""
    if cfg.ep > 1:
        expert_copies(cfg)
    if cfg.memory_per_worker_gb and (Path(cfg.model_path) / "config.json").is_file():
        from raymoe.parallel.shard_memory import WorkerMemoryError
        from raymoe.serve.shard_memory import check_layout_fits

        try:
            check_layout_fits(cfg.model_path, cfg.ep, cfg.redundant_experts, cfg.memory_per_worker_gb)
        except WorkerMemoryError as exc:
            raise ConfigError(str(exc)) from None


def expert_copies(cfg: ServeConfig) -> list[int]:
    """Physical copies of each logical expert in the placement the replica serves with (1 each
    with ep=1; EPLB's redundant copies with ep > 1); [] when the artifact is not readable here.

    Raises:
        ConfigError: the expert slots do not split evenly over ep (or name unknown experts).
    """
    if not (Path(cfg.model_path) / "config.json").is_file():
        return []
    from raymoe.models.hf_io import read_hf_config
    from raymoe.parallel.layout import ExpertPlacement
    from raymoe.serve.live_placement import expert_copies_of

    num_experts = read_hf_config(cfg.model_path)[0].moe.num_experts
    if cfg.ep == 1:
        return [1] * num_experts
    placement = ExpertPlacement.with_redundant(num_experts, cfg.ep, list(cfg.redundant_experts))
    return expert_copies_of(placement.slot_expert, num_experts)


def engine_precision(cfg: ServeConfig) -> Precision:
    """The dtype the engine computes in (`cfg.dtype` resolved for the device it runs on)."""
    import torch

    from raymoe.inference.decode_dtype_probe import decode_gemv_seconds
    from raymoe.inference.packed import onednn_available
    from raymoe.models.hf_io import read_hf_config
    from raymoe.precision import resolve_precision

    on_gpu = (cfg.shard_num_gpus if cfg.ep > 1 else cfg.num_gpus) > 0 and torch.cuda.is_available()
    model_dim = read_hf_config(cfg.model_path)[0].dim
    probe = None
    if not on_gpu and cfg.engine.cpu_kernels == "onednn" and onednn_available():
        # The engine's own packed kernels, timed with the threads its weights will run on.
        threads = (cfg.shard_num_threads if cfg.ep > 1 else cfg.engine.num_threads) or torch.get_num_threads()
        probe = functools.partial(decode_gemv_seconds, model_dim, threads)
    return resolve_precision(
        cfg.dtype, "cuda" if on_gpu else "cpu", model_dim=model_dim, cpu_decode=True, decode_probe=probe
    )


def engine_dtype_label(cfg: ServeConfig) -> str:
    """The `dtype` label of raymoe_serve_engine_info: int8, or the resolved compute dtype."""
    return "int8" if cfg.int8 else engine_precision(cfg).name


def build_core(cfg: ServeConfig, adapters: list[str]) -> EngineCore:
    """Loads the artifact and makes the engine core (in the thread or process that runs it)."""
    if cfg.ep > 1:
        from raymoe.serve.shard_workers import ShardedModel

        sharded = ShardedModel.launch(
            cfg.model_path,
            cfg.ep,
            redundant_experts=cfg.redundant_experts,
            num_cpus=cfg.shard_num_cpus,
            num_gpus=cfg.shard_num_gpus,
            num_threads=cfg.shard_num_threads,
            cpu_kernels=cfg.engine.cpu_kernels,
            expert_threads=cfg.engine.expert_threads,
            memory_per_worker_gb=cfg.memory_per_worker_gb,
            dtype=engine_precision(cfg).name,
        )
        return EngineCore(sharded, cfg.engine, kv_cache_factory=sharded.make_cache)
    return EngineCore(load_model(cfg, adapters), cfg.engine)


def build_engine(cfg: ServeConfig):
    """The engine the replica serves and the LoRA adapters it has loaded.

    With ep=1 and `engine.own_process` (the default) the core runs in a child process
    (`raymoe.serve.engine_process`), away from the GIL of the replica's event loop and Ray's
    threads. Otherwise it runs in a thread of the replica (`LocalEngine`); with ep>1 that thread
    drives the shard-worker actors, which need this process's Ray connection. Either way the
    artifact is loaded where the model will run: that thread or process is the only one that
    starts torch's OpenMP team. A second team beside it (from loading in the replica's thread)
    makes libgomp count more threads than cores and stop its workers spinning between kernels;
    measured, a 2-thread packed GEMM went from 159 to 190 us and a served one-request decode from
    10 to 18 ms per token.
    """
    from raymoe.serve.local_engine import LocalEngine

    adapters = list_adapters(cfg.lora_dir)
    build = functools.partial(build_core, cfg, adapters)
    if cfg.ep == 1 and cfg.engine.own_process:
        from raymoe.serve.engine_process import ProcessEngine

        engine = ProcessEngine(build, num_threads=cfg.engine.num_threads, nice=cfg.engine.process_nice)
        return engine, adapters
    return LocalEngine(build=build, num_threads=cfg.engine.num_threads), adapters


def load_model(cfg: ServeConfig, adapters: list[str]):
    """The artifact as the engine runs it: on GPU when asked, INT8 or packed (fp32 or bf16), with adapters."""
    import torch

    from raymoe.inference.packed import pack_onednn, wants_packed_weights
    from raymoe.models import load_hf
    from raymoe.serve.shard_memory import check_shard_fits

    # The whole model in this process: checked against the budget before any tensor is read.
    fits = functools.partial(check_shard_fits, layout="ep=1", memory_per_worker_gb=cfg.memory_per_worker_gb)
    model = load_hf(cfg.model_path, check=fits)
    if cfg.num_gpus > 0 and torch.cuda.is_available():
        model = model.to("cuda")
    if adapters:
        from raymoe.models.lora import attach_adapters

        attach_adapters(model, {name: Path(cfg.lora_dir) / name for name in adapters})
    if engine_precision(cfg).is_bf16 and not cfg.int8:
        model = model.to(torch.bfloat16)  # after LoRA: the adapters' A/B too
    # After LoRA: the adapters' base layers are quantized or packed, their A/B keep their dtype.
    if cfg.int8:
        from raymoe.inference.quantize import quantize_int8

        quantize_int8(model, expert_threads=cfg.engine.expert_threads)
    elif wants_packed_weights(cfg.engine.cpu_kernels, model):
        pack_onednn(model, expert_threads=cfg.engine.expert_threads)
    return model


def build_server(cfg: ServeConfig, replica_tag: str | None = None):
    """Engine + tokenizer + names + key (+ the traffic sampler): what the HTTP routes need.

    Args:
        cfg: the application's config.
        replica_tag: names this replica's traffic window files (default: host and pid).
    """
    from raymoe.data.chat_tokenizer import ChatTokenizer
    from raymoe.serve.admission import Admission
    from raymoe.serve.http_app import OpenAIServer

    engine, adapters = build_engine(cfg)
    tokenizer = ChatTokenizer.from_dir(cfg.model_path)
    traffic = None
    if cfg.traffic.enabled:
        from raymoe.serve.traffic_sampler import TrafficSampler

        # Buckets over the tokenizer's vocabulary: prompt ids are below it (the HTTP layer checks),
        # and the ingest profile's token unigram has the same length.
        traffic = TrafficSampler(
            cfg.traffic,
            model_id=cfg.model_id,
            vocab_size=tokenizer.tokenizer.get_vocab_size(),
            expert_counts=engine.expert_counts,
            replica_tag=replica_tag,
        )
    return OpenAIServer(
        engine=engine,
        tokenizer=tokenizer,
        model_id=cfg.model_id,
        adapters=adapters,
        api_key=read_api_key(cfg),
        retry_after_s=cfg.retry_after_s,
        stream_interval=cfg.stream_interval,
        traffic=traffic,
        admission=Admission(max_ongoing=cfg.max_ongoing_requests, max_queued=cfg.max_queued_requests),
        backpressure_status=cfg.backpressure_status,
    )


def replica_tag() -> str | None:
    """This Serve replica's unique id (None outside a replica)."""
    from ray import serve

    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - not in a replica: the sampler's host-pid default
        return None


def serve_max_ongoing(cfg: ServeConfig) -> int:
    """Requests Serve lets into one replica at once: 10x what the replica admits, so that a burst
    that large reaches the replica and is refused there straight away. Requests Serve holds back
    wait in its router, which retries a full replica with backoff: 400 concurrent streams against
    32 + 64 waited 5.4 s (p99) for their refusal at 2x, 1.6 s with room for all (2 busy cores)."""
    return 10 * (cfg.max_ongoing_requests + max(cfg.max_queued_requests, 0))


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Ray Serve deployment options from the config (autoscaling, backpressure, resources).

    The replica admits requests itself (`raymoe.serve.admission`, from `max_ongoing_requests`,
    `max_queued_requests` and `backpressure_status`), so Serve's limits sit above it: Serve's
    refusal would be plain text.
    """
    from ray.serve.config import AutoscalingConfig as RayAutoscaling

    a = cfg.autoscaling
    return dict(
        name=cfg.name,
        max_ongoing_requests=serve_max_ongoing(cfg),
        # Unbounded: a request Serve cannot hand to a replica yet waits for a place instead of
        # being refused in plain text (so Serve's BackpressureConfig never applies).
        max_queued_requests=-1,
        autoscaling_config=RayAutoscaling(
            min_replicas=a.min_replicas,
            max_replicas=a.max_replicas,
            target_ongoing_requests=a.target_ongoing_requests,
            upscale_delay_s=a.upscale_delay_s,
            downscale_delay_s=a.downscale_delay_s,
        ),
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        health_check_period_s=cfg.health_check_period_s,
    )


def _deployment_class():
    from ray import serve

    @serve.ingress()
    class OpenAIDeployment:
        """One replica: loads the artifact, owns an engine, serves the FastAPI app."""

        def __init__(self, config: dict):
            from raymoe.serve.serve_metrics import ServeMetrics

            self.config = from_dict(ServeConfig, config)
            # Decided once, here (`auto` may time both dtypes): the engine, in this process or
            # its own, computes in what is logged and exported.
            precision = engine_precision(self.config)
            if not self.config.int8:
                self.config = dataclasses.replace(self.config, dtype=precision.name)
            self.server = build_server(self.config, replica_tag())
            self.metrics = ServeMetrics.create(self.config.model_id)
            self.metrics.expert_copies = expert_copies(self.config)
            log.warning(
                "engine computes in %s", "int8 weights (int8: true)" if self.config.int8 else precision.describe()
            )
            self.metrics.set_engine_dtype("int8" if self.config.int8 else precision.name)
            self.server.observe = self.metrics.observe_request
            self.server.count = self.metrics.count_request
            if self.metrics.enabled:
                self.metrics.start_engine_gauges(self.server.engine)

        def check_health(self) -> None:
            """Serve's periodic probe: a replica whose engine thread or process died is restarted."""
            self.server.engine.check_alive()
            model = getattr(getattr(self.server.engine, "core", None), "model", None)
            check_shards = getattr(model, "check_health", None)
            if check_shards is not None:
                check_shards()  # a dead shard worker restarts the replica (and its shards)

        def placement(self) -> dict:
            """Serve handle method: the expert placement this replica serves with
            (`raymoe.serve.live_placement.replica_placement`, plus `replica`)."""
            from raymoe.serve.live_placement import replica_placement

            num_experts = len(self.metrics.expert_copies) or self._num_experts()
            return {
                **replica_placement(self.server.engine, num_experts),
                "replica": replica_tag(),
                # What the raymoe_serve_expert_copies gauge of this replica says.
                "published_expert_copies": list(self.metrics.expert_copies),
            }

        async def apply_placement(self, slot_expert: list[int]) -> dict:
            """Serve handle method: live re-placement of this replica's experts (ep > 1), with
            requests flowing; `raymoe.serve.live_placement.apply_to_app` calls it on every replica.
            The switch runs in a thread, off the event loop that streams the replies."""
            import asyncio

            from raymoe.serve.live_placement import apply_on_replica

            answer = await asyncio.to_thread(apply_on_replica, self.server.engine, slot_expert)
            self.metrics.set_expert_copies(answer["expert_copies"])
            return {**answer, "replica": replica_tag()}

        def _num_experts(self) -> int:
            return self.server.engine.expert_counts().shape[1]

        def __del__(self):
            """Serve calls this when it stops the replica: the engine process stops with it (it
            would also exit on its own once this process's end of its pipe closes)."""
            if hasattr(self, "server"):  # absent when __init__ failed
                if self.server.traffic is not None:
                    self.server.traffic.close()  # the last window, with the engine's final counts
                self.server.engine.close()

        def __serve_build_asgi_app__(self):
            from raymoe.serve.http_app import create_app

            return create_app(self.server)

    return OpenAIDeployment


def build_app(args: dict[str, Any]):
    """Serve application builder (`serve run raymoe.serve.app:build_app key=value ...`).

    Args:
        args: a ServeConfig as plain data (CLI `key=value` pairs arrive as strings; nested keys
            are accepted as dotted names, e.g. `engine.num_slots=4`).

    Returns:
        A bound `ray.serve.Application`.
    """
    from ray import serve

    cfg = from_dict(ServeConfig, _nest(dict(args)))
    check_expert_slots(cfg)
    # The decorator form: Ray's types give the (class, **options) form a decorator's return type.
    deployment = serve.deployment(**deployment_options(cfg))(_deployment_class())
    return deployment.bind(to_dict(cfg))


def _nest(args: dict[str, Any]) -> dict[str, Any]:
    """`serve run` passes args as flat strings: nests dotted keys and parses values as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for key, value in args.items():
        # Paths and names stay strings ("007" is a directory, not the number 7).
        literal = key in ("model_path", "model_id", "name") or key.endswith(("_file", "_dir", "_env"))
        if isinstance(value, str) and not literal and value != "":
            value = yaml.safe_load(value)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out
