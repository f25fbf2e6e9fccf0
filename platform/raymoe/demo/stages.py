"""The demo's stages up to the exported model and its adapters: one function per stage.

Each is the library call its own pipeline makes (`pipelines.ingest`, `pipelines.train`,
`raymoe export`, `pipelines.finetune`, `pipelines.federated`), on `run.plan`'s configs, and
returns a `Done`: the console line, the outputs a rerun checks for and a few numbers. The stages
around the served app are in `raymoe.demo.live`; the report and the dashboards are here too.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Done:
    """What a finished stage reports: its console line, its outputs (paths) and its numbers."""

    summary: str
    outputs: dict[str, str]
    result: dict[str, Any] = field(default_factory=dict)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The training history's records, one per step (a resumed run's repeat of a step wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn last line of a killed run
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def ingest(run, stage) -> Done:
    from raymoe.data.ingest import run_ingest

    run.ensure_ray()
    manifest = run_ingest(run.plan.ingest)
    counts = manifest["counts"]
    tokens = sum(split["tokens"] for split in counts["written"].values())
    path = run.plan.paths.manifest
    return Done(
        f"{counts['kept_docs']} documents -> {len(manifest['shards'])} Parquet shards, {tokens:,} tokens, "
        f"{counts['quarantined_total']} quarantined",
        {"manifest": str(path)},
        {"tokens": tokens, "documents": counts["kept_docs"]},
    )


def train(run, stage) -> Done:
    from raymoe.train.config import check_before_launch

    cfg = run.plan.train
    if run.config_changed("train"):
        # Training resumes from the newest checkpoint under checkpoint.uri: right after a run that
        # was cut off, wrong after one of another config (or other data), which starts afresh.
        shutil.rmtree(cfg.checkpoint.uri, ignore_errors=True)
        Path(cfg.history_path).unlink(missing_ok=True)
    check_before_launch(cfg)
    run.ensure_ray()
    from raymoe.train.loop import run_training

    result = run_training(cfg)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    history = read_history(cfg.history_path)
    losses = [r["loss"] for r in history if "loss" in r]
    speed = [r["tokens_per_s"] for r in history if "tokens_per_s" in r]
    step = (result.metrics or {}).get("step", history[-1]["step"] if history else cfg.steps)
    loss = f", loss {losses[0]:.2f} -> {losses[-1]:.2f}" if losses else ""
    tok_s = f", {sorted(speed)[len(speed) // 2]:,.0f} tokens/s" if speed else ""
    return Done(
        f"{cfg.flavour} MoE, {step} steps on Ray Train, ep={cfg.layout.ep} x dp={cfg.layout.dp}{loss}{tok_s}",
        {"checkpoints": cfg.checkpoint.uri, "history": cfg.history_path},
        {"step": step, "loss": losses[-1] if losses else None},
    )


def export(run, stage) -> Done:
    from raymoe.train.export import export_checkpoint

    p = run.plan.paths
    manifest = export_checkpoint(str(p.checkpoints), str(p.model))
    size = sum(f.stat().st_size for f in p.model.glob("*.safetensors"))
    step = manifest["checkpoint"]["step"]
    return Done(
        f"checkpoint step {step} -> {manifest['architecture']} safetensors ({size / 2**20:.1f} MiB), "
        "loadable by transformers",
        {"config": str(p.model / "config.json")},
        {"step": step},
    )


def finetune(run, stage) -> Done:
    from raymoe.train.finetune import prepare_data, run_finetune, summary_line
    from raymoe.train.finetune_config import check_before_launch

    cfg = run.plan.finetune
    check_before_launch(cfg)
    data = prepare_data(cfg)
    run.ensure_ray()
    summary = run_finetune(cfg, data)
    return Done(
        summary_line(cfg, data, summary),
        {"adapter": str(Path(summary["adapter"]) / "adapter_config.json")},
        {"eval": summary.get("eval")},
    )


def federated(run, stage) -> Done:
    from raymoe.federated.job import check_before_launch, run_federated

    cfg = run.plan.federated
    if run.config_changed("federated"):
        shutil.rmtree(cfg.output_dir, ignore_errors=True)  # it would resume the old rounds otherwise
    check_before_launch(cfg)
    run.ensure_ray()
    summary = run_federated(cfg, on_round_start=lambda round, names: stage.set_progress(round - 1))
    stage.set_progress(summary["rounds"])
    last = summary["history"][-1] if summary["history"] else {}
    silos = ", ".join(sorted(summary["silos"]))
    loss = f", server held-out loss {last['eval_loss']:.2f}" if last.get("eval_loss") is not None else ""
    return Done(
        f"{summary['rounds']} round(s) of {cfg.strategy.name} over {len(cfg.silos)} silos ({silos}), "
        f"{cfg.local_steps} local steps each{loss}",
        {"adapter": str(Path(summary["adapter"]) / "adapter_config.json")},
        {"rounds": summary["rounds"], "eval_loss": last.get("eval_loss")},
    )


def report(run, stage) -> Done:
    """`raymoe report` of the training run, the federated run and the drift check."""
    from raymoe.monitor.run_report import write_run_report

    p = run.plan.paths
    written = []
    for name, run_dir in (("train", p.work), ("federated", p.federated), ("drift", p.drift)):
        written += write_run_report(run_dir, p.report / name)
    return Done(
        f"{len(written)} PNG plots (" + ", ".join(f"{w.parent.name}/{w.name}" for w in written) + ")",
        {f"{w.parent.name}/{w.stem}": str(w) for w in written},
    )


def dashboards(run, stage) -> Done:
    """`raymoe dashboards export`: Grafana JSON per dashboard and the provisioning files."""
    from raymoe.monitor.dashboards.grafana_push import export as export_dashboards

    paths = export_dashboards(run.plan.paths.dashboards)
    boards = [path for path in paths if path.suffix == ".json"]
    return Done(
        f"{len(boards)} Grafana dashboards (" + ", ".join(b.stem for b in boards) + ") + provisioning files",
        {path.name: str(path) for path in paths},
    )
