"""The per-worker training program, independent of Ray: build, shard, resume, step, checkpoint.

`run_worker` runs under any initialised torch.distributed group (Ray Train's, or processes a test
spawns) or in a single process. `raymoe.train.loop` wraps it for Ray Train.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from raymoe.config import to_dict
from raymoe.models import MoETransformer
from raymoe.parallel.groups import ParallelGroups, build_groups
from raymoe.parallel.layout import shard_model_experts
from raymoe.train.activation_checkpoint import apply_activation_checkpointing
from raymoe.train.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from raymoe.train.config import TrainConfig
from raymoe.train.data import PackedBatches
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


def worker_device(cfg: TrainConfig) -> torch.device:
    if cfg.use_gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def build_sharded_model(cfg: TrainConfig, groups: ParallelGroups, device: torch.device) -> MoETransformer:
    """The full model from `cfg.seed` (identical on every rank), then only this rank's experts."""
    model = MoETransformer(cfg.model_config())
    # Same seed everywhere: dense weights start identical, and expert e starts the same whatever
    # rank holds it, so any layout trains the same model.
    model.init_weights(seed=cfg.seed)
    shard_model_experts(model, cfg.layout, groups.rank, ep_group=groups.ep_group)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model.to(device)


def _broadcast_int(value: int | None, groups: ParallelGroups) -> int | None:
    if not groups.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_worker(
    cfg: TrainConfig,
    *,
    tokens_path: str,
    report: Reporter | None = None,
    extra_manifest: dict[str, Any] | None = None,
) -> WorkerSummary:
    """Trains until `cfg.steps`, resuming from the newest valid checkpoint when allowed.

    Args:
        cfg: the validated run config.
        tokens_path: packed token array (raymoe.train.data.prepare_tokens).
        report: called after each logged step with console metrics (rank 0 prints them).
        extra_manifest: JSON-able data stored in every checkpoint manifest.

    Returns:
        This worker's summary.
    """
    torch.set_num_threads(cfg.num_threads_per_worker)
    groups = build_groups(cfg.layout)
    torch.manual_seed(cfg.seed + groups.rank)
    device = worker_device(cfg)
    model = build_sharded_model(cfg, groups, device)
    optimizer = build_optimizer(model, cfg.optim)

    start_step, data_position, resumed_metrics, resumed_path = 0, 0, {}, None
    if cfg.checkpoint.resume:
        found = latest_valid_checkpoint(cfg.checkpoint.uri) if groups.rank == 0 else None
        found = _broadcast_int(found, groups)
        if found is not None:
            loaded = load_checkpoint(cfg.checkpoint.uri, found, model=model, optimizer=optimizer,
                                     groups=groups)
            start_step, data_position = loaded.step, loaded.data_position
            resumed_metrics, resumed_path = loaded.metrics, loaded.path
            if loaded.layout != {"ep": cfg.layout.ep, "dp": cfg.layout.dp}:
                # New layout: the old per-rank RNG streams do not map onto the new ranks.
                torch.manual_seed(cfg.seed + 1000 * start_step + groups.rank)
            if groups.rank == 0:
                log.warning("resumed from %s (step %d, saved at layout %s)", loaded.path,
                            loaded.step, loaded.layout)

    batches = PackedBatches(tokens_path, seq_len=cfg.data.seq_len,
                            global_batch_size=cfg.data.global_batch_size,
                            world_size=groups.world_size, rank=groups.rank, seed=cfg.data.seed)
    summary = WorkerSummary(start_step=start_step, final_step=start_step)
    # Every checkpoint can rebuild its model and says how it was trained (export needs both).
    extra_manifest = {"model_config": to_dict(cfg.model_config()), "train_config": cfg.to_dict(),
                      **(extra_manifest or {})}
    accum = cfg.optim.grad_accum_steps
    run_start = time.perf_counter()
    window_start, window_tokens = run_start, 0
    for step in range(start_step, cfg.steps):
        micro = [batches.batch(data_position + i) for i in range(accum)]
        result = train_step(model, optimizer, micro, groups=groups,
                            lr=lr_at(step, cfg.optim, cfg.steps), clip_norm=cfg.optim.clip_norm,
                            bf16=cfg.bf16)
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
                cfg.checkpoint.uri, step=done, data_position=data_position, model=model,
                optimizer=optimizer, groups=groups, keep=cfg.checkpoint.keep,
                extra={**extra_manifest,
                       "metrics": {"loss": result.loss, "grad_norm": result.grad_norm}})
            checkpoint_seconds = time.perf_counter() - t0
            summary.checkpoints.append(done)
        if report is not None and (done % cfg.log_every == 0 or done == cfg.steps
                                   or checkpoint_seconds is not None):
            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            steps_per_s = (done - start_step) / max(now - run_start, 1e-9)
            metrics = {
                "step": done, "loss": result.loss, "aux_loss": result.aux_loss,
                "grad_norm": result.grad_norm, "lr": result.lr, "tokens_per_s": tokens_per_s,
                "eta_s": (cfg.steps - done) / max(steps_per_s, 1e-9), "start_step": start_step,
                "rank": groups.rank,
            }
            if checkpoint_seconds is not None:
                metrics["checkpoint_s"] = checkpoint_seconds
                metrics["checkpoint_path"] = checkpoint_path
            report(metrics, result)
            window_start, window_tokens = now, 0
    if report is not None and start_step >= cfg.steps:
        # Restarted after the last checkpoint was already final: nothing to train, but the caller
        # still gets the run's final numbers.
        report({"step": start_step, "start_step": start_step, "rank": groups.rank,
                "loss": resumed_metrics.get("loss", float("nan")), "checkpoint_path": resumed_path},
               None)
    return summary
