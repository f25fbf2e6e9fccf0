"""Quality decay: a history of held-out evaluations of the served model, and the decay flag.

Each `pipelines.drift --eval` run appends one point (perplexity, and exact match when the eval set
has one right answer per record) to `quality-history.jsonl`. Decay is measured against the first
point of the same model and adapter, the quality the model was deployed with:
decay = perplexity / first perplexity (1 = unchanged), flagged when it exceeds 1 + threshold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def perplexity(mean_nll: float) -> float:
    """exp of the mean negative log-likelihood per token (nats)."""
    return math.exp(mean_nll)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The points recorded so far (none when the file does not exist yet).

    Raises:
        ValueError: a line that is not a JSON object with a positive finite `perplexity`, naming
            the file and line (the history is the deployment's baseline; it is not guessed around).
    """
    path = Path(path)
    if not path.is_file():
        return []
    points = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            point = json.loads(line)
            ok = isinstance(point, dict) and math.isfinite(point["perplexity"]) and point["perplexity"] > 0
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"{path}:{number}: not a quality point (JSON with a positive perplexity)")
        points.append(point)
    return points


def judge(history: list[dict[str, Any]], point: dict[str, Any], threshold: float) -> dict[str, Any]:
    """`point` with `decay` (over the first point of the same model and adapter, or over itself
    when it is the first) and `decayed` (decay > 1 + threshold) added."""
    key = (point.get("model"), point.get("adapter"))
    first = next((p for p in history if (p.get("model"), p.get("adapter")) == key), point)
    decay = point["perplexity"] / first["perplexity"]
    return {**point, "decay": decay, "decayed": bool(decay > 1 + threshold), "baseline_time": first.get("time")}
