"""`raymoe report RUN_DIR`: PNG plots of whatever a run directory holds, for people without Grafana.

What is read (each optional; whatever is absent is skipped with a log line):
  train-history.jsonl      one line per logged training step: {"time": unix s, "step", "loss"
                           (nats/token), "tokens_per_s" (all workers), "tokens_per_expert": (L, E)
                           nested lists}; a resumed run appends the steps after its checkpoint
                           again, so the last line of a step wins. Written by the training loop's
                           RayReporter when `history_path` is set (raymoe.train.loop).
  step-*/manifest.json     training checkpoints (raymoe.train.checkpoint.save_checkpoint), also
  checkpoints/step-*/...   under checkpoints/: "step" and "metrics": {"loss", "grad_norm"} per
                           checkpoint, only the newest `checkpoint.keep` of them; the loss fallback.
  metrics.json             a federated run's summary (raymoe.federated.job.run_federated): its
                           "history" has one record per round with "eval_loss" and "silo_loss".
  drift-history.jsonl      the drift job (raymoe.monitor.drift_check.write_outputs): {"time": unix s,
                           "window", "summary": drift.summary()}.
  quality-history.jsonl    the drift job's --eval (pipelines/drift.py check_quality): {"time": unix s,
                           "model", "adapter", "perplexity", "decay", "exact_match" (optional)}.

Written: loss.png, tokens_per_s.png, expert_load.png, drift_scores.png, quality.png, each atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from raymoe.atomic_io import atomic_write_bytes
from raymoe.monitor import plots

log = logging.getLogger(__name__)

# The training loop's RayReporter appends this when `history_path` points here (rank 0, one line
# per logged step); the name follows the drift job's `<kind>-history.jsonl`.
TRAIN_HISTORY_FILE = "train-history.jsonl"
DRIFT_HISTORY_FILE = "drift-history.jsonl"
QUALITY_HISTORY_FILE = "quality-history.jsonl"
FEDERATED_METRICS_FILE = "metrics.json"
# The run dir may be a checkpoint.uri itself or the directory above a `checkpoints/` one.
CHECKPOINT_MANIFEST_GLOBS = ("step-*/manifest.json", "checkpoints/step-*/manifest.json")
NUMBER = (int, float)


def read_jsonl(path: Path, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """The records of a JSON-lines file that parse and carry the `required` {key: type(s)}.

    A writer killed mid-append leaves a torn last line, so bad lines are skipped, counted and
    logged with their line numbers rather than failing the whole report.
    """
    records, bad = [], []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in required.items()):
                bad.append(number)
                continue
            records.append(record)
    if bad:
        log.warning(
            "%s: skipped %d line(s) that are not JSON objects with %s (lines %s)",
            path,
            len(bad),
            {k: getattr(t, "__name__", str(t)) for k, t in required.items()},
            bad[:10],
        )
    return records


def _train_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / TRAIN_HISTORY_FILE
    if not path.is_file():
        log.info("no %s in %s", TRAIN_HISTORY_FILE, run_dir)
        return []
    by_step = {r["step"]: r for r in read_jsonl(path, {"step": int})}  # later lines win (resume)
    return [by_step[s] for s in sorted(by_step)]


def _checkpoint_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    points = {}
    for pattern in CHECKPOINT_MANIFEST_GLOBS:
        for path in run_dir.glob(pattern):
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
                points[int(manifest["step"])] = float(manifest["metrics"]["loss"])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s: no step and metrics.loss (%s); skipped", path, exc)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _federated_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / FEDERATED_METRICS_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:  # written atomically, so this is damage, not a torn write
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    # A fine-tuning run writes a metrics.json too, without per-round history.
    history = data.get("history") if isinstance(data, dict) else None
    return history if isinstance(history, list) else []


def _loss_figure(run_dir: Path, train: list[dict[str, Any]]) -> Figure | None:
    points = [(r["step"], r["loss"]) for r in train if r.get("loss") is not None]
    if points:
        steps, losses = zip(*points)
        return plots.line_figure(
            {"loss (nats/token)": {"train": (steps, losses)}}, title="Training loss", xlabel="step"
        )
    kept_steps, kept_losses = _checkpoint_losses(run_dir)
    if kept_steps:
        log.info("loss: %d point(s) from checkpoint manifests (only the kept checkpoints)", len(kept_steps))
        return plots.line_figure(
            {"loss (nats/token)": {"at checkpoints": (kept_steps, kept_losses)}},
            title="Training loss at checkpoints",
            xlabel="step",
        )
    rounds = _federated_history(run_dir)
    if rounds:
        series: dict[str, tuple[Sequence[Any], Sequence[float]]] = {}
        evals = [(r["round"], r["eval_loss"]) for r in rounds if r.get("eval_loss") is not None]
        if evals:
            series["server eval"] = ([x for x, _ in evals], [y for _, y in evals])
        for silo in sorted({s for r in rounds for s in r.get("silo_loss", {})}):
            pts = [(r["round"], r["silo_loss"][silo]) for r in rounds if r.get("silo_loss", {}).get(silo) is not None]
            if pts:
                series[f"silo {silo} (local)"] = ([x for x, _ in pts], [y for _, y in pts])
        if series:
            return plots.line_figure({"loss (nats/token)": series}, title="Federated loss per round", xlabel="round")
    log.info(
        "no loss in %s (no %s, checkpoint manifest or federated %s history)",
        run_dir,
        TRAIN_HISTORY_FILE,
        FEDERATED_METRICS_FILE,
    )
    return None


def _quality_figure(points: list[dict[str, Any]]) -> Figure | None:
    """Perplexity, decay and exact match over time, one series per (model, adapter): decay is
    relative to the first point of the same pair (raymoe.monitor.quality_history.judge)."""
    panels: dict[str, dict[str, tuple]] = {}
    for key, label in (
        ("perplexity", "perplexity"),
        ("decay", "decay (x first perplexity)"),
        ("exact_match", "exact match (share)"),
    ):
        for pair in dict.fromkeys((p.get("model"), p.get("adapter")) for p in points):
            pts = [
                (p["time"], p[key])
                for p in points
                if (p.get("model"), p.get("adapter")) == pair and isinstance(p.get(key), NUMBER)
            ]
            if pts:
                model, adapter = pair
                name = f"{model or 'model'}" + (f" + {adapter}" if adapter else "")
                times, values = zip(*pts)
                panels.setdefault(label, {})[name] = (plots.utc_datetimes(times), values)
    if not panels:
        return None
    return plots.line_figure(panels, title="Served-model quality on the held-out set", xlabel="time (UTC)", dates=True)


def run_report_figures(run_dir: str | Path) -> dict[str, Figure]:
    """The report's figures by file stem ("loss", "tokens_per_s", "expert_load", "drift_scores",
    "quality"); only those whose data the run directory holds."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    figures: dict[str, Figure] = {}
    train = _train_history(run_dir)
    if (loss := _loss_figure(run_dir, train)) is not None:
        figures["loss"] = loss

    speed = [(r["step"], r["tokens_per_s"]) for r in train if r.get("tokens_per_s") is not None]
    if speed:
        steps, values = zip(*speed)
        figures["tokens_per_s"] = plots.line_figure(
            {"tokens/s (all workers)": {"train": (steps, values)}}, title="Training throughput", xlabel="step"
        )
    else:
        log.info("no tokens/s in %s: it is only in %s", run_dir, TRAIN_HISTORY_FILE)

    loads = [r for r in train if r.get("tokens_per_expert")]
    if loads:
        counts_LE = np.asarray(loads[-1]["tokens_per_expert"])
        figures["expert_load"] = plots.expert_load_figure(
            counts_LE, title=f"Tokens per expert at step {loads[-1]['step']}"
        )
    else:
        log.info("no tokens per expert in %s: they are only in %s", run_dir, TRAIN_HISTORY_FILE)

    drift_path = run_dir / DRIFT_HISTORY_FILE
    drift = read_jsonl(drift_path, {"time": NUMBER, "summary": dict}) if drift_path.is_file() else []
    if any(r["summary"].get("features") for r in drift):
        figures["drift_scores"] = plots.drift_scores_figure(drift)
    else:
        log.info("no drift results in %s (%s)", run_dir, DRIFT_HISTORY_FILE)

    quality_path = run_dir / QUALITY_HISTORY_FILE
    quality = read_jsonl(quality_path, {"time": NUMBER}) if quality_path.is_file() else []
    if (fig := _quality_figure(quality)) is not None:
        figures["quality"] = fig
    else:
        log.info("no quality history in %s (%s)", run_dir, QUALITY_HISTORY_FILE)
    return figures


def write_run_report(run_dir: str | Path, out_dir: str | Path, *, dpi: int = plots.DPI) -> list[Path]:
    """Writes `<out_dir>/<name>.png` for every plot the run directory has data for.

    Args:
        run_dir: a training run (its checkpoint root or the directory above `checkpoints/`), a
            federated output_dir, or a drift job's output directory.
        out_dir: where the PNGs go (created if missing); each is replaced atomically.
        dpi: pixels per inch of the PNGs.

    Returns:
        The written paths, in the order loss, tokens/s, expert load, drift scores, quality.

    Raises:
        FileNotFoundError: `run_dir` does not exist or holds nothing to plot (names the directory
            and the files looked for).
    """
    figures = run_report_figures(run_dir)
    if not figures:
        raise FileNotFoundError(
            f"nothing to plot in {run_dir}: no {TRAIN_HISTORY_FILE}, checkpoint manifest "
            f"({' or '.join(CHECKPOINT_MANIFEST_GLOBS)}), federated {FEDERATED_METRICS_FILE} with a "
            f"history, {DRIFT_HISTORY_FILE} or {QUALITY_HISTORY_FILE}"
        )
    written = []
    for name, fig in figures.items():
        written.append(atomic_write_bytes(Path(out_dir) / f"{name}.png", plots.png_bytes(fig, dpi)))
        log.info("wrote %s", written[-1])
    return written
