"""One drift check: read the current traffic windows and the reference, run the detectors, write
`drift.json` + `report.html`, append to `drift-history.jsonl`, and set the Prometheus gauges.

The reference is either earlier traffic windows (every feature) or the ingest manifest's profile:
its token unigram, bucketed the way the serving app buckets prompt tokens, and its document-length
histogram, compared with the prompts' lengths on the same bins (`prompt_length_binned`). Training
documents are not prompts, so the length comparison against a manifest says "prompts look unlike
the training data", not "traffic changed"; compare windows for the latter.

A window file that cannot be read is skipped and recorded in `quarantine.jsonl` with the reason.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raymoe.atomic_io import append_jsonl, atomic_write_bytes, atomic_write_json
from raymoe.monitor import metrics as m
from raymoe.monitor.drift import compare_windows, summary
from raymoe.monitor.drift_job_config import DriftJobConfig, window_files
from raymoe.monitor.run_report import DRIFT_HISTORY_FILE
from raymoe.monitor.traffic_windows import TrafficWindow, merge_windows, read_window

log = logging.getLogger(__name__)

ROUTER_FEATURES = ("expert_load",)  # drift here means placement is stale, not the inputs


@dataclass
class CheckResult:
    summary: dict[str, Any]
    meta: dict[str, Any]
    reference: dict[str, np.ndarray]
    current: dict[str, np.ndarray]

    @property
    def drifted(self) -> bool:
        return bool(self.summary["drifted"])

    @property
    def router_drift(self) -> bool:
        return any(f in ROUTER_FEATURES for f in self.summary["drifted_features"])

    @property
    def input_drift(self) -> bool:
        return any(f not in ROUTER_FEATURES for f in self.summary["drifted_features"])


def read_valid_windows(paths: list[str], quarantine: Path) -> list[TrafficWindow]:
    """The readable windows of `paths`; each unreadable one is logged to `quarantine`."""
    windows = []
    for path in paths:
        try:
            windows.append(read_window(path))
        except ValueError as exc:
            log.warning("drift: skipping window %s: %s", path, exc)
            append_jsonl(quarantine, {"time": time.time(), "path": path, "reason": str(exc)})
    return windows


def manifest_reference(manifest: dict, current: TrafficWindow) -> dict[str, np.ndarray]:
    """The manifest profile as a window comparable with `current`.

    Raises:
        ValueError: the manifest has no profile, or its vocabulary differs from the traffic's.
    """
    profile = manifest.get("profile")
    if not profile:
        raise ValueError("the ingest manifest has no `profile` section (written by pipelines.ingest)")
    unigram = np.asarray(profile["token_unigram"]["counts"], dtype=np.int64)
    vocab, buckets = int(current.meta["vocab_size"]), int(current.meta["token_buckets"])
    if len(unigram) != vocab:
        raise ValueError(
            f"the manifest's vocabulary has {len(unigram)} tokens, the served model's {vocab}: not the same tokenizer"
        )
    # Same rule as the serving app: token t goes to bucket t * K // V.
    token_histogram = np.bincount(np.arange(vocab) * buckets // vocab, weights=unigram, minlength=buckets).astype(
        np.int64
    )
    edges = profile["doc_length_tokens"]["edges"]
    return {
        "token_histogram": token_histogram,
        "prompt_length_binned": np.asarray(profile["doc_length_tokens"]["counts"], dtype=np.int64),
        "_edges": np.asarray(edges),
    }


def _read_manifest(path: str) -> dict:
    file = Path(path) if Path(path).is_file() else Path(path) / "manifest.json"
    return json.loads(file.read_text(encoding="utf-8"))


def _select(window: dict, features: list[str]) -> dict:
    return window if "all" in features else {k: v for k, v in window.items() if k in features}


def run_check(cfg: DriftJobConfig) -> CheckResult:
    """Compares the current window with the reference (see the module doc)."""
    out = Path(cfg.output_dir)
    ref_paths, cur_paths = window_files(cfg)
    quarantine = out / "quarantine.jsonl"
    current_windows = read_valid_windows(cur_paths, quarantine)
    if not current_windows:
        raise ValueError(f"no readable current window among {cur_paths} (see {quarantine})")
    current = merge_windows(current_windows)
    cur_features = dict(current.features)
    if cfg.reference.kind == "manifest":
        reference = manifest_reference(_read_manifest(cfg.reference.manifest), current)
        edges = reference.pop("_edges")
        lengths = np.asarray(cur_features["prompt_length"])
        cur_features["prompt_length_binned"] = np.bincount(
            np.searchsorted(edges, lengths, side="right") - 1, minlength=len(edges)
        )
        ref_label = f"manifest {cfg.reference.manifest}"
    else:
        ref_windows = read_valid_windows(ref_paths, quarantine)
        if not ref_windows:
            raise ValueError(f"no readable reference window among {ref_paths} (see {quarantine})")
        reference = dict(merge_windows(ref_windows).features)
        ref_label = f"{len(ref_windows)} window(s)"
    reference, cur_features = _select(reference, cfg.features), _select(cur_features, cfg.features)
    results = compare_windows(reference, cur_features, cfg.detectors)
    meta = {
        "run": cfg.name,
        "time": time.time(),
        "reference": ref_label,
        "reference_files": ref_paths,
        "current_files": cur_paths,
        "current_requests": int(current.meta.get("num_sampled", len(cur_features.get("prompt_length", [])))),
        "model": current.meta.get("model", ""),
    }
    return CheckResult(summary(results), meta, reference, cur_features)


def write_outputs(cfg: DriftJobConfig, result: CheckResult) -> dict[str, Path]:
    """drift.json and report.html (replaced atomically), plus a line in drift-history.jsonl."""
    from raymoe.monitor.drift_html import render_drift_html  # matplotlib: only when reporting

    out = Path(cfg.output_dir)
    record = {"meta": result.meta, "summary": result.summary}
    paths = {"json": atomic_write_json(out / "drift.json", record)}
    html = render_drift_html(
        result.summary, result.reference, result.current, title=f"raymoe drift report: {cfg.name}", meta=result.meta
    )
    paths["html"] = atomic_write_bytes(out / "report.html", html.encode("utf-8"))
    append_jsonl(
        out / DRIFT_HISTORY_FILE,
        {
            "time": result.meta["time"],
            "window": ",".join(Path(p).name for p in result.meta["current_files"]),
            "summary": result.summary,
        },
    )
    return paths


def publish_drift(run: str, drift_summary: dict[str, Any]) -> None:
    """Sets score, threshold, p-value (tests only) and alarm gauges per (feature, detector).

    Only in a process where Ray is initialised; Prometheus scrapes them from Ray's metrics agent.
    """
    for feature, entry in drift_summary["features"].items():
        for detector, r in entry["detectors"].items():
            tags = {"run": run, "detector": detector, "feature": feature}
            m.ray_metric(m.DRIFT_SCORE).set(r["score"], tags=tags)
            m.ray_metric(m.DRIFT_THRESHOLD).set(r["threshold"], tags=tags)
            m.ray_metric(m.DRIFT_ALARM).set(1.0 if r["drifted"] else 0.0, tags=tags)
            if r["p_value"] is not None:
                m.ray_metric(m.DRIFT_P_VALUE).set(r["p_value"], tags=tags)
