"""Stage markers: what lets a rerun of the demo reuse the stages that already finished.

After a stage succeeds the demo writes `<work_dir>/.stages/<stage>.json` (atomically):
    {"stage", "config_hash", "finished_at" (unix s), "seconds", "summary" (the console line),
     "outputs": {name: path}, "result": {...}}
`config_hash` covers the stage's effective config (after overrides and the demo's paths) and the
hashes of the stages it reads from, so changing a stage's config also reruns everything after it.
A stage is reused when its marker's hash matches and every output path still exists; a stage that
runs makes every stage that depends on it run too (`stages_to_run`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from raymoe.atomic_io import atomic_write_json

MARKER_DIR = ".stages"


def config_hash(config: Any, upstream: list[str] | tuple[str, ...] = ()) -> str:
    """sha256 of a stage's config (plain data) and its upstream stages' hashes, in order."""
    text = json.dumps({"config": config, "upstream": list(upstream)}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def marker_path(work_dir: str | Path, stage: str) -> Path:
    return Path(work_dir) / MARKER_DIR / f"{stage}.json"


def read_marker(work_dir: str | Path, stage: str) -> dict | None:
    """The stage's marker, or None when there is none (or it is not a marker: then it reruns)."""
    try:
        data = json.loads(marker_path(work_dir, stage).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("outputs"), dict) and isinstance(data.get("config_hash"), str)
    return data if ok else None


def reusable(marker: dict | None, expected_hash: str) -> bool:
    """True when `marker` was written for `expected_hash` and all its outputs still exist."""
    if marker is None or marker["config_hash"] != expected_hash:
        return False
    return all(Path(path).exists() for path in marker["outputs"].values())


def write_marker(
    work_dir: str | Path,
    stage: str,
    expected_hash: str,
    *,
    outputs: dict[str, str],
    summary: str,
    seconds: float,
    result: dict | None = None,
) -> dict:
    """Records a finished stage; returns the marker."""
    marker = {
        "stage": stage,
        "config_hash": expected_hash,
        "finished_at": time.time(),
        "seconds": seconds,
        "summary": summary,
        "outputs": {k: str(v) for k, v in outputs.items()},
        "result": result or {},
    }
    atomic_write_json(marker_path(work_dir, stage), marker)
    return marker


def stages_to_run(order: list[str], deps: dict[str, tuple[str, ...]], reuse: dict[str, bool]) -> set[str]:
    """The stages that must run: those not reusable and every stage downstream of one.

    Args:
        order: every stage, each after the stages it depends on.
        deps: stage -> the stages whose outputs it reads.
        reuse: stage -> whether its marker allows reusing it (`reusable`).
    """
    run: set[str] = set()
    for stage in order:
        if not reuse.get(stage, False) or any(d in run for d in deps.get(stage, ())):
            run.add(stage)
    return run
