"""Training job configuration: model flavour + overrides, layout, optimiser, data, checkpoints.

Everything that can be checked without starting a worker is checked here (`TrainConfig` itself in
`__post_init__`, the filesystem in `check_before_launch`), so a bad run fails in the driver with a
message naming the field and the value.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

from raymoe.config import (
    ConfigError,
    from_dict,
    require,
    require_at_least,
    require_positive,
    require_resource,
    to_dict,
)
from raymoe.models.config import FLAVOURS, ModelConfig, flavour
from raymoe.parallel.layout import ParallelLayout
from raymoe.precision import PRECISIONS


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `lr * min_lr_ratio`."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Clip by the true global norm across expert shards; 0 disables clipping.
    clip_norm: float = 1.0
    # Micro-batches per optimizer step (each worker runs this many forward/backward passes).
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        require_positive("optim", self, "lr", "eps")
        require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require_at_least("optim", self, warmup_steps=0, weight_decay=0, clip_norm=0, grad_accum_steps=1)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(0 <= value < 1, f"optim.{name} must be in [0, 1), got {value}")


@dataclass(kw_only=True)
class TrainDataConfig:
    """Which ingest output the tokens come from and how they are cut into batches."""

    # An ingest output directory (manifest.json + Parquet token shards of seq_len + 1 tokens per
    # row, `python -m pipelines.ingest`), on a local or mounted filesystem every worker reads.
    path: str
    seq_len: int = 128
    # Sequences per micro-batch summed over all workers; each worker takes 1/world of it.
    global_batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        require(bool(self.path), "data.path must be set (an ingest output directory)")
        require(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        require(self.global_batch_size >= 1, f"data.global_batch_size must be >= 1, got {self.global_batch_size}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Sharded checkpoints: every worker writes its own experts; see raymoe.train.checkpoint."""

    # Any pyarrow filesystem URI or local path (s3://bucket/run, gs://..., /mnt/ckpt, runs/x).
    uri: str
    every_steps: int = 50
    # Complete checkpoints to keep (oldest removed first); 0 keeps all.
    keep: int = 3
    # Start from the newest complete checkpoint under `uri` when one exists.
    resume: bool = True

    def __post_init__(self) -> None:
        require(bool(self.uri), "checkpoint.uri must be set")
        require(self.every_steps >= 1, f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        require(self.keep >= 0, f"checkpoint.keep must be >= 0, got {self.keep}")


@dataclass(kw_only=True)
class TrainFailureConfig:
    """Ray Train restarts the whole worker group from the last checkpoint up to this many times."""

    max_failures: int = 0

    def __post_init__(self) -> None:
        require(self.max_failures >= -1, f"failure.max_failures must be >= -1, got {self.max_failures}")


@dataclass(kw_only=True)
class TrainConfig:
    """A training run; YAML at pipelines/configs/train.*.yaml."""

    name: str = "train"
    # Named model shape (raymoe.models.FLAVOURS) and field overrides on it, e.g. {dim: 64}.
    flavour: str = "debug"
    model: dict[str, Any] = field(default_factory=dict)
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: TrainDataConfig
    checkpoint: CheckpointConfig
    failure: TrainFailureConfig = field(default_factory=TrainFailureConfig)
    # Optimizer steps in the whole run (resumed runs stop at the same step).
    steps: int
    seed: int = 0
    # Workers to start; 0 = layout.ep * layout.dp. Set it to have the layout checked against it.
    num_workers: int = 0
    # Ray resources per worker; fractional on small machines (world size = layout.ep * layout.dp).
    num_cpus_per_worker: float = 1.0
    # Memory one worker may use (GiB), 0 = no limit. Requested from Ray as the `memory` resource,
    # and a layout whose per-worker parameters + gradients + AdamW state would exceed it fails
    # before any worker starts, naming the numbers.
    memory_per_worker_gb: float = 0.0
    # torch intra-op threads per worker.
    num_threads_per_worker: int = 1
    use_gpu: bool = False
    # Compute dtype: "auto" = bf16 autocast (fp32 master weights, fp32 routing and loss) where
    # the device has fast bf16 (AMX / AVX512-BF16 CPUs, bf16 CUDA devices), fp32 elsewhere;
    # "fp32" or "bf16" force either (`raymoe.precision`).
    precision: str = "auto"
    # Recompute each block in backward instead of storing its activations.
    activation_checkpointing: bool = False
    log_every: int = 10
    # Peak dense TFLOP/s of one worker, for MFU (0 = do not report MFU). ~0.17 for one thread
    # of this project's CPUs in fp32, ~989 for an H100 in bf16.
    peak_tflops_per_worker: float = 0.0
    # Ray Train's own run storage (results, error files); checkpoints go to checkpoint.uri.
    storage_path: str = "runs/ray-train"
    # Rank 0 appends one JSON line per logged step (loss, tokens/s, tokens per expert, ...) here,
    # for `raymoe report`; a local path (on a cluster: a volume every node mounts). "" = none.
    history_path: str = ""

    def __post_init__(self) -> None:
        require(self.flavour in FLAVOURS, f"flavour {self.flavour!r} unknown; known: {list(FLAVOURS)}")
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(
            self.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        require_resource("num_cpus_per_worker", self.num_cpus_per_worker)
        require(self.num_cpus_per_worker > 0, f"num_cpus_per_worker must be > 0, got {self.num_cpus_per_worker}")
        require_at_least(
            "",
            self,
            memory_per_worker_gb=0,
            num_workers=0,
            num_threads_per_worker=1,
            log_every=1,
            peak_tflops_per_worker=0,
        )
        model = self.model_config()
        self.layout.validate(num_experts=model.moe.num_experts)
        world = self.layout.world_size
        if self.num_workers:
            self.layout.validate(num_experts=model.moe.num_experts, world_size=self.num_workers)
        require(
            self.data.global_batch_size % world == 0,
            f"data.global_batch_size={self.data.global_batch_size} must be divisible by the world "
            f"size layout.ep * layout.dp = {world}",
        )
        require(
            self.data.seq_len <= model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={model.max_seq_len}",
        )

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def local_batch_size(self) -> int:
        """Sequences per micro-batch on one worker."""
        return self.data.global_batch_size // self.layout.world_size

    def model_config(self) -> ModelConfig:
        """The flavour with `model` overrides applied (nested keys such as moe.num_experts work)."""
        base = to_dict(flavour(self.flavour))
        merged = _deep_merge(base, self.model, "model")
        return from_dict(ModelConfig, merged, prefix="model")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _deep_merge(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in out:
            raise ConfigError(f"unknown key {where}.{key} for ModelConfig; known keys: {sorted(out)}")
        if isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _deep_merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def check_before_launch(cfg: TrainConfig) -> None:
    """Checks what needs the filesystem or the model's size, without reading any token.

    `data.path` must be a local (or mounted) ingest output whose rows, tokenizer and train split
    fit the run (shard checksums are verified once, by `run_training`); with
    `memory_per_worker_gb` set, one worker's share of the model must fit it.

    Raises:
        ConfigError: naming the field and its value.
    """
    from raymoe.parallel.shard_memory import WorkerMemoryError
    from raymoe.train.data import check_ingest_output

    if "://" in cfg.data.path:
        raise ConfigError(
            f"data.path={cfg.data.path!r}: workers read the shards from a local or "
            f"mounted directory; URIs are not supported"
        )
    if not os.path.isdir(cfg.data.path):
        raise ConfigError(
            f"data.path={cfg.data.path!r} does not exist; it must be an ingest "
            f"output: run python -m pipelines.ingest with output_dir={cfg.data.path} "
            f"first"
        )
    model = cfg.model_config()
    try:
        check_ingest_output(
            cfg.data.path,
            seq_len=cfg.data.seq_len,
            vocab_size=model.vocab_size,
            global_batch_size=cfg.data.global_batch_size,
            verify=False,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if cfg.memory_per_worker_gb:
        try:
            check_layout_memory(cfg)
        except WorkerMemoryError as exc:
            raise ConfigError(str(exc)) from None


def check_layout_memory(cfg: TrainConfig) -> int:
    """Estimated training bytes of the most loaded worker of the layout (built on the meta device).

    Raises:
        WorkerMemoryError: over `memory_per_worker_gb`.
    """
    import torch

    from raymoe.models import MoETransformer
    from raymoe.parallel.layout import ExpertPlacement, keep_placed_experts
    from raymoe.train.memory import check_fits

    model_cfg = cfg.model_config()
    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    keep_placed_experts(model, ExpertPlacement.contiguous(model_cfg.moe.num_experts, cfg.layout.ep))
    return check_fits(
        model,
        layout=f"ep={cfg.layout.ep} x dp={cfg.layout.dp}",
        memory_per_worker_gb=cfg.memory_per_worker_gb,
        address_space=False,
    )
