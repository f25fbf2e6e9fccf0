"""The per-worker training program, independent of Ray: build, shard, resume, step, checkpoint.

`run_worker` runs under any initialised torch.distributed group (Ray Train's, or processes a test
spawns) or in a single process. `raymoe.train.loop` wraps it for Ray Train.

A worker never holds more than its share: the model is built on the meta device, sharded there,
checked against the worker's memory limit, and only then allocated (dense weights + this rank's
experts), each tensor initialised once. Resuming reads only the tensors it holds; the tokens come
from the ingest shards by position.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from raymoe.config import to_dict
from raymoe.models import MoETransformer
from raymoe.parallel.groups import ParallelGroups, build_groups
from raymoe.parallel.layout import shard_model_experts
from raymoe.parallel.shard_memory import peak_rss_bytes, shard_bytes
from raymoe.precision import resolve_precision
from raymoe.train.activation_checkpoint import apply_activation_checkpointing
from raymoe.train.checkpoint import resume_checkpoint, save_checkpoint
from raymoe.train.config import TrainConfig
from raymoe.train.data import TrainBatches
from raymoe.train.memory import check_fits, optimizer_bytes
from raymoe.train.schedule import lr_at
from raymoe.train.step import StepResult, build_optimizer, train_step

log = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any], StepResult | None], None]


@dataclass
class WorkerSummary:
    """What one worker's run did (returned to the caller / the tests)."""

    start_step: int
    final_step: int
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    # Memory this worker held after its last step: parameter bytes (dense, routed experts) and
    # optimizer-state bytes; its peak resident set size over the whole run.
    dense_bytes: int = 0
    expert_bytes: int = 0
    optimizer_bytes: int = 0
    peak_rss_bytes: int = 0
    # Seconds from entering run_worker until the model was built, initialised (or resumed) and
    # the optimizer ready to step.
    startup_s: float = 0.0


def worker_device(cfg: TrainConfig) -> torch.device:
    if cfg.use_gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def build_sharded_model(
    cfg: TrainConfig, groups: ParallelGroups, device: torch.device, *, init: bool = True
) -> MoETransformer:
    """This rank's model: dense weights + its experts, allocated on `device` and initialised once.

    Built on the meta device and sharded there, so the experts of other ranks are never
    allocated. Initial values come from `cfg.seed` per tensor (per expert), so dense weights are
    identical on every rank and expert e starts the same whatever rank holds it: any layout
    trains the same model. With `init=False` the weights are left for a checkpoint to fill (then
    `model.init_weights(cfg.seed)` if none loads).

    Raises:
        WorkerMemoryError: the shard's training tensors would exceed the worker's memory limit.
    """
    with torch.device("meta"):
        model = MoETransformer(cfg.model_config())
    shard_model_experts(model, cfg.layout, groups.rank, ep_group=groups.ep_group)
    check_fits(model, layout=f"ep={cfg.layout.ep} x dp={cfg.layout.dp}", memory_per_worker_gb=cfg.memory_per_worker_gb)
    model.materialize(device, seed=cfg.seed, init=init)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def run_worker(
    cfg: TrainConfig,
    *,
    report: Reporter | None = None,
    extra_manifest: dict[str, Any] | None = None,
) -> WorkerSummary:
    """Trains until `cfg.steps`, resuming from the newest valid checkpoint when allowed.

    Args:
        cfg: the validated run config; `cfg.data.path` is an ingest output (checked by the
            driver with `raymoe.train.data.check_ingest_output`).
        report: called after each logged step with console metrics (rank 0 prints them).
        extra_manifest: JSON-able data stored in every checkpoint manifest.

    Returns:
        This worker's summary.
    """
    started = time.perf_counter()
    torch.set_num_threads(cfg.num_threads_per_worker)
    groups = build_groups(cfg.layout)
    torch.manual_seed(cfg.seed + groups.rank)
    device = worker_device(cfg)
    precision = resolve_precision(cfg.precision, device, model_dim=cfg.model_config().dim)
    if groups.rank == 0:
        log.warning("training computes in %s", precision.describe())
    # Resuming: the weights come from the checkpoint, so they are not drawn first.
    model = build_sharded_model(cfg, groups, device, init=not cfg.checkpoint.resume)
    optimizer = build_optimizer(model, cfg.optim)

    start_step, data_position, resumed_metrics, resumed_path = 0, 0, {}, None
    if cfg.checkpoint.resume:
        loaded = resume_checkpoint(cfg.checkpoint.uri, model=model, optimizer=optimizer, groups=groups)
        if loaded is None:
            model.init_weights(seed=cfg.seed)
        else:
            start_step, data_position = loaded.step, loaded.data_position
            resumed_metrics, resumed_path = loaded.metrics, loaded.path
            if loaded.layout != {"ep": cfg.layout.ep, "dp": cfg.layout.dp}:
                # New layout: the old per-rank RNG streams do not map onto the new ranks.
                torch.manual_seed(cfg.seed + 1000 * start_step + groups.rank)
            if groups.rank == 0:
                log.warning("resumed from %s (step %d, saved at layout %s)", loaded.path, loaded.step, loaded.layout)

    batches = TrainBatches(
        cfg.data.path,
        seq_len=cfg.data.seq_len,
        global_batch_size=cfg.data.global_batch_size,
        world_size=groups.world_size,
        rank=groups.rank,
        seed=cfg.data.seed,
    )
    summary = WorkerSummary(start_step=start_step, final_step=start_step, startup_s=time.perf_counter() - started)
    # Every checkpoint can rebuild its model and says how it was trained (export needs both).
    extra_manifest = {
        "model_config": to_dict(cfg.model_config()),
        "train_config": cfg.to_dict(),
        **(extra_manifest or {}),
    }
    accum = cfg.optim.grad_accum_steps
    run_start = time.perf_counter()
    window_start, window_tokens = run_start, 0
    for step in range(start_step, cfg.steps):
        micro = [batches.batch(data_position + i) for i in range(accum)]
        result = train_step(
            model,
            optimizer,
            micro,
            groups=groups,
            lr=lr_at(step, cfg.optim, cfg.steps),
            clip_norm=cfg.optim.clip_norm,
            bf16=precision.is_bf16,
        )
        data_position += accum
        done = step + 1
        summary.losses.append(result.loss)
        summary.grad_norms.append(result.grad_norm)
        summary.final_step = done
        window_tokens += result.tokens
        checkpoint_seconds, checkpoint_path = None, None
        if done % cfg.checkpoint.every_steps == 0 or done == cfg.steps:
            t0 = time.perf_counter()
            checkpoint_path = save_checkpoint(
                cfg.checkpoint.uri,
                step=done,
                data_position=data_position,
                model=model,
                optimizer=optimizer,
                groups=groups,
                keep=cfg.checkpoint.keep,
                extra={**extra_manifest, "metrics": {"loss": result.loss, "grad_norm": result.grad_norm}},
            )
            checkpoint_seconds = time.perf_counter() - t0
            summary.checkpoints.append(done)
        if report is not None and (done % cfg.log_every == 0 or done == cfg.steps or checkpoint_seconds is not None):
            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            steps_per_s = (done - start_step) / max(now - run_start, 1e-9)
            metrics: dict[str, Any] = {
                "step": done,
                "loss": result.loss,
                "aux_loss": result.aux_loss,
                "grad_norm": result.grad_norm,
                "lr": result.lr,
                "tokens_per_s": tokens_per_s,
                "eta_s": (cfg.steps - done) / max(steps_per_s, 1e-9),
                "start_step": start_step,
                "rank": groups.rank,
                "precision": precision.name,
            }
            if checkpoint_seconds is not None:
                metrics["checkpoint_s"] = checkpoint_seconds
                metrics["checkpoint_path"] = checkpoint_path
            report(metrics, result)
            window_start, window_tokens = now, 0
    if report is not None and start_step >= cfg.steps:
        # Restarted after the last checkpoint was already final: nothing to train, but the caller
        # still gets the run's final numbers.
        report(
            {
                "step": start_step,
                "start_step": start_step,
                "rank": groups.rank,
                "loss": resumed_metrics.get("loss", float("nan")),
                "checkpoint_path": resumed_path,
            },
            None,
        )
    held = shard_bytes(model)
    summary.dense_bytes, summary.expert_bytes = held.dense, held.experts
    summary.optimizer_bytes = optimizer_bytes(optimizer)
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary
