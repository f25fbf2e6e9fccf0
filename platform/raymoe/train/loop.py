"""Ray Train entry: one TorchTrainer worker (a Ray actor) per rank of the `ep x dp` layout.

The driver validates the config and checks the ingest output (manifest and shard checksums; it
reads no tokens into memory) before any worker starts; each worker runs
`raymoe.train.worker.run_worker` inside the gloo (CPU) or NCCL (GPU) group Ray Train forms and
reads its own rows from the shards.
Ray Train's FailureConfig restarts the whole worker group when a worker dies; the restarted
workers resume from the newest valid checkpoint under `checkpoint.uri`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

from raymoe.config import from_dict
from raymoe.train.config import TrainConfig, check_before_launch
from raymoe.train.data import check_ingest_output
from raymoe.train.step import StepResult

log = logging.getLogger(__name__)

# What a Ray Train checkpoint of this platform holds: a pointer to the sharded checkpoint.
POINTER_FILE = "raymoe_checkpoint.json"


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def console_line(metrics: dict[str, Any], total_steps: int) -> str:
    """The line rank 0 prints: step, loss, tokens/s and ETA."""
    return (
        f"step {metrics['step']}/{total_steps}  loss {metrics['loss']:.4f}  "
        f"tok/s {metrics['tokens_per_s']:.0f}  lr {metrics['lr']:.2e}  "
        f"gnorm {metrics['grad_norm']:.3f}  eta {_format_eta(metrics['eta_s'])}"
    )


class RayReporter:
    """Sends step metrics to Ray Train, ray.util.metrics and (rank 0) the console."""

    def __init__(self, cfg: TrainConfig, flops_per_token: float):
        self.cfg = cfg
        self.flops_per_token = flops_per_token

    def _append_history(self, metrics: dict[str, Any], result: StepResult | None) -> None:
        """One line of `history_path` (`raymoe report` plots it; a resumed run appends the steps
        after its checkpoint again, and the reader keeps the last line of a step)."""
        from raymoe.atomic_io import append_jsonl

        keys = ("step", "loss", "aux_loss", "grad_norm", "lr", "tokens_per_s", "mfu")
        record = {"time": time.time(), **{k: metrics[k] for k in keys if k in metrics}}
        if result is not None:
            record["tokens_per_expert"] = result.tokens_per_expert_LE.tolist()
        append_jsonl(self.cfg.history_path, record)

    def __call__(self, metrics: dict[str, Any], result: StepResult | None) -> None:
        import ray.train

        from raymoe.monitor import metrics as m

        rank = metrics["rank"]
        run = {"run": self.cfg.name}
        if self.cfg.peak_tflops_per_worker > 0 and "tokens_per_s" in metrics:
            peak = self.cfg.peak_tflops_per_worker * 1e12 * self.cfg.world_size
            metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / peak
        # Counters only take positive increments (ep=1 moves nothing).
        if result is not None and result.all_to_all_bytes > 0:
            m.ray_metric(m.TRAIN_ALL_TO_ALL_BYTES).inc(result.all_to_all_bytes, tags={**run, "rank": str(rank)})
        if result is not None and result.all_to_all_seconds > 0:
            m.ray_metric(m.TRAIN_ALL_TO_ALL_SECONDS).inc(result.all_to_all_seconds, tags={**run, "rank": str(rank)})
        if rank == 0 and "tokens_per_s" not in metrics:
            print(f"step {metrics['step']}/{self.cfg.steps}: already complete", flush=True)
        elif rank == 0:
            print(console_line(metrics, self.cfg.steps), flush=True)
            m.ray_metric(m.TRAIN_STEP).set(metrics["step"], tags=run)
            m.ray_metric(m.TRAIN_LOSS).set(metrics["loss"], tags=run)
            m.ray_metric(m.TRAIN_TOKENS_PER_SECOND).set(metrics["tokens_per_s"], tags=run)
            m.ray_metric(m.TRAIN_GRAD_NORM).set(metrics["grad_norm"], tags=run)
            m.ray_metric(m.TRAIN_LR).set(metrics["lr"], tags=run)
            m.ray_metric(m.TRAIN_PRECISION_INFO).set(1, tags={**run, "dtype": metrics["precision"]})
            if "mfu" in metrics:
                m.ray_metric(m.TRAIN_MFU).set(metrics["mfu"], tags=run)
            if "checkpoint_s" in metrics:
                m.ray_metric(m.TRAIN_CHECKPOINT_SECONDS).observe(metrics["checkpoint_s"], tags=run)
            if self.cfg.history_path:
                self._append_history(metrics, result)
            if result is not None:
                for layer, counts_E in enumerate(result.tokens_per_expert_LE.tolist()):
                    tags = {**run, "layer": str(layer)}
                    mean = sum(counts_E) / max(len(counts_E), 1)
                    m.ray_metric(m.TRAIN_LOAD_IMBALANCE).set(max(counts_E) / max(mean, 1e-9), tags=tags)
                    for expert, count in enumerate(counts_E):
                        m.ray_metric(m.TRAIN_TOKENS_PER_EXPERT).set(count, tags={**tags, "expert": str(expert)})
        # Every worker reports at the same steps (ray.train.report is a barrier). Rank 0 also
        # registers the sharded checkpoint it just committed through a pointer (a tiny JSON file
        # naming it): Ray Train knows it (Result.checkpoint) without copying the shards.
        report = {k: v for k, v in metrics.items() if k != "rank"}
        if rank == 0 and "checkpoint_path" in metrics:
            with tempfile.TemporaryDirectory() as tmp:
                pointer = {"uri": self.cfg.checkpoint.uri, "path": metrics["checkpoint_path"], "step": metrics["step"]}
                with open(os.path.join(tmp, POINTER_FILE), "w") as fh:
                    json.dump(pointer, fh)
                ray.train.report(
                    report,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"pointer-step-{metrics['step']:08d}",
                )
        else:
            ray.train.report(report)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker body: rebuild the config from plain data and run the worker program."""
    from ray.train.v2._internal.execution import context as train_context

    from raymoe.train.worker import run_worker

    # Ray Train logs every report ("Reporting training result ...") and checkpoint at INFO on
    # every worker; the console line above already says what a user needs.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = from_dict(TrainConfig, loop_config["cfg"])
    # 6 FLOPs per parameter per token (forward 2, backward 4); attention's T^2 term left out.
    flops_per_token = 6.0 * loop_config["active_params"]
    run_worker(cfg, report=RayReporter(cfg, flops_per_token), extra_manifest=loop_config["extra"])


def absolute_paths(data: dict[str, Any]) -> dict[str, Any]:
    """Config data with local relative paths made absolute (URIs with a scheme stay as they are)."""

    def fix(path: str) -> str:
        return path if not path or "://" in path else os.path.abspath(path)

    data["data"]["path"] = fix(data["data"]["path"])
    data["checkpoint"]["uri"] = fix(data["checkpoint"]["uri"])
    data["storage_path"] = fix(data["storage_path"])
    data["history_path"] = fix(data.get("history_path", ""))
    return data


def active_params(cfg: TrainConfig) -> int:
    """Parameters one token passes through (top-k routed experts, not all of them)."""
    import torch

    from raymoe.models import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(cfg.model_config())
    return model.num_params(active=True)


def run_training(cfg: TrainConfig):
    """Validates, checks the ingest output, and runs the TorchTrainer to `cfg.steps`.

    Returns:
        The Ray Train `Result` (`result.metrics` holds the last reported step's metrics).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    check_before_launch(cfg)
    # Workers run in their own directories: relative paths are resolved here, in the driver.
    cfg = from_dict(TrainConfig, absolute_paths(cfg.to_dict()))
    data = check_ingest_output(
        cfg.data.path,
        seq_len=cfg.data.seq_len,
        vocab_size=cfg.model_config().vocab_size,
        global_batch_size=cfg.data.global_batch_size,
    )
    extra = {"data": {"manifest": data.manifest_path, "tokenizer_dir": data.tokenizer_dir}}
    loop_config = {"cfg": cfg.to_dict(), "extra": extra, "active_params": active_params(cfg)}
    threads = str(cfg.num_threads_per_worker)
    resources = {"CPU": cfg.num_cpus_per_worker}
    if cfg.memory_per_worker_gb:
        resources["memory"] = int(cfg.memory_per_worker_gb * 1024**3)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.world_size,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources,
        ),
        # ray.train exports Train v2's RunConfig, which takes worker_runtime_env; mypy reads v1's.
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]
            # A fresh Ray Train run name each time: reusing one would make Ray resume that run's
            # state. Our own resume goes through checkpoint.uri.
            name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures),
            # Ray Train's print patch would echo rank 0's console line a second time via logging.
            worker_runtime_env={
                "env_vars": {
                    "OMP_NUM_THREADS": threads,
                    "MKL_NUM_THREADS": threads,
                    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                }
            },
        ),
    )
    return trainer.fit()
