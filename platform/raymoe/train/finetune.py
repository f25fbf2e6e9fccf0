"""LoRA fine-tuning on Ray Train: the driver's side (checks, workers, evaluation, merge).

One TorchTrainer worker (a Ray actor) per rank of the `ep x dp` layout, exactly as pre-training;
each runs `raymoe.train.finetune_worker.run_finetune_worker`. Before any worker starts the driver
checks the config and the files, reads the records once to quarantine bad ones (with reasons,
under output_dir/quarantine) and stops if nothing is left to train on. After training it
evaluates base vs adapter on the held-out file and, if asked, writes the merged artifact.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from raymoe.atomic_io import atomic_write_json
from raymoe.config import ConfigError, from_dict
from raymoe.train.finetune_config import FinetuneConfig, check_before_launch


def prepare_data(cfg: FinetuneConfig) -> dict[str, Any]:
    """Reads the records once in the driver: counts and quarantine file; raises if none is usable."""
    from raymoe.data.chat_tokenizer import ChatTokenizer
    from raymoe.data.quarantine import write_quarantine
    from raymoe.data.sft import load_sft_examples, quarantine_counts

    tokenizer = ChatTokenizer.from_dir(cfg.base)
    examples, entries = load_sft_examples(cfg.data.path, tokenizer, cfg.data.max_seq_len, cfg.data.truncation)
    if cfg.eval_path:
        from raymoe.train.adapter_eval import read_eval_records

        try:
            usable = read_eval_records(cfg.eval_path)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"eval_path={cfg.eval_path!r} is not UTF-8 text: {exc}") from None
        if not usable:
            raise ConfigError(f"eval_path={cfg.eval_path!r} holds no valid record")
    if len(examples) < cfg.global_batch_size:
        raise ConfigError(
            f"data.path={cfg.data.path!r} has {len(examples)} usable records "
            f"({len(entries)} quarantined), fewer than global_batch_size={cfg.global_batch_size}"
        )
    if entries:  # written once the run is known to go ahead (a refused run writes nothing)
        write_quarantine(cfg.output_dir, entries)
    return {
        "examples": len(examples),
        "quarantined": quarantine_counts(entries),
        "answer_tokens": sum(sum(t != -100 for t in e.labels) for e in examples),
    }


def _loop_per_worker(loop_config: dict[str, Any]) -> None:
    import logging

    import ray.train
    from ray.train.v2._internal.execution import context as train_context

    from raymoe.train.finetune_worker import run_finetune_worker

    cfg = from_dict(FinetuneConfig, loop_config["cfg"])
    # Ray Train logs every report at INFO on every worker; the console line says what matters.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)

    def report(metrics: dict[str, Any]) -> None:
        from raymoe.monitor import metrics as m

        if metrics["rank"] == 0:
            print(
                f"step {metrics['step']}/{cfg.steps}  loss {metrics['loss']:.4f}  "
                f"tok/s {metrics['tokens_per_s']:.0f}  lr {metrics['lr']:.2e}",
                flush=True,
            )
            run = {"run": cfg.name}
            m.ray_metric(m.FINETUNE_STEP).set(metrics["step"], tags=run)
            m.ray_metric(m.FINETUNE_LOSS).set(metrics["loss"], tags=run)
            m.ray_metric(m.FINETUNE_TOKENS_PER_SECOND).set(metrics["tokens_per_s"], tags=run)
        ray.train.report({k: v for k, v in metrics.items() if k != "rank"})

    summary = run_finetune_worker(cfg, report)
    ray.train.report({"final_loss": summary.losses[-1], "seconds": summary.seconds, "tokens": summary.tokens})


def absolute(cfg: FinetuneConfig) -> FinetuneConfig:
    """The config with local paths made absolute (workers run in their own directories)."""
    data = cfg.to_dict()
    for key in ("base", "debug_base", "output_dir", "eval_path", "storage_path"):
        if data[key] and "://" not in data[key]:
            data[key] = os.path.abspath(data[key])
    data["data"]["path"] = os.path.abspath(data["data"]["path"])
    return from_dict(FinetuneConfig, data)


def make_debug_base(cfg: FinetuneConfig) -> None:
    """Writes the debug config's random-weight base artifact (tokenizer trained on the records)."""
    from raymoe.serve.debug_artifact import make_debug_artifact

    with open(cfg.data.path, encoding="utf-8") as fh:
        texts = [line for line in fh if line.strip()]
    make_debug_artifact(cfg.base, seed=cfg.seed, vocab_size=1024, corpus=texts, max_seq_len=512)


def summary_line(cfg: FinetuneConfig, data: dict[str, Any], summary: dict[str, Any]) -> str:
    """One line for the console: the adapter, the steps, the records and the held-out change."""
    task = Path(cfg.data.path).parent.name
    line = f"LoRA r={cfg.lora.rank}, {cfg.steps} steps on {data['examples']} records of {task}"
    if "eval" in summary:
        base, tuned = summary["eval"]["base"], summary["eval"]["adapter"]
        line += (
            f", held-out answer loss {base['loss']:.2f} -> {tuned['loss']:.2f} "
            f"(exact match {base['exact_match']:.0%} -> {tuned['exact_match']:.0%})"
        )
    return line


def run_finetune(cfg: FinetuneConfig, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checks, trains on Ray Train, evaluates and (optionally) merges; returns the run summary,
    also written to output_dir/metrics.json. `data`: `prepare_data`'s result when the caller
    has already read the records (the pipeline does, before Ray starts)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute(cfg)
    check_before_launch(cfg)
    if cfg.writes_debug_base and not os.path.isfile(os.path.join(cfg.base, "config.json")):
        make_debug_base(cfg)
        check_before_launch(cfg)
    data = data or prepare_data(cfg)
    print(
        f"fine-tuning {cfg.base} on {data['examples']} records "
        f"({sum(data['quarantined'].values())} quarantined), {cfg.steps} steps, "
        f"layout ep={cfg.layout.ep} x dp={cfg.layout.dp}",
        flush=True,
    )
    threads = str(cfg.num_threads_per_worker)
    trainer = TorchTrainer(
        _loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict()},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.layout.world_size, resources_per_worker={"CPU": cfg.num_cpus_per_worker}
        ),
        # ray.train exports Train v2's RunConfig, which takes worker_runtime_env; mypy reads v1's.
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]
            name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=cfg.storage_path,
            worker_runtime_env={
                "env_vars": {
                    "OMP_NUM_THREADS": threads,
                    "MKL_NUM_THREADS": threads,
                    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                }
            },
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"fine-tuning failed: {result.error}")
    summary: dict[str, Any] = {"adapter": cfg.adapter_dir, "data": data, "train": result.metrics}
    if cfg.eval_path:
        from raymoe.train.adapter_eval import evaluate_base_and_adapter, format_table

        summary["eval"] = evaluate_base_and_adapter(
            cfg.base, cfg.adapter_dir, cfg.eval_path, cfg.data.max_seq_len, cfg.eval_max_new_tokens
        )
        print(format_table(summary["eval"]), flush=True)
    if cfg.merge:
        from raymoe.models.lora_merge import merge_adapter

        summary["merged"] = str(merge_adapter(cfg.base, cfg.adapter_dir, os.path.join(cfg.output_dir, "merged")))
    atomic_write_json(os.path.join(cfg.output_dir, "metrics.json"), summary)
    return summary
