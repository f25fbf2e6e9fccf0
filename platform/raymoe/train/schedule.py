"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio * lr` at the last step."""

from __future__ import annotations

import math

from raymoe.train.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `total_steps` run.

    Warmup: lr * (step + 1) / warmup_steps for step < warmup_steps (the first step is not lr 0).
    Then lr_min + (lr - lr_min) * (1 + cos(pi * progress)) / 2, progress going 0 -> 1 from the end
    of warmup to the last step.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    lr_min = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return lr_min + (cfg.lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
