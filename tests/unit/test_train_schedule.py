"""Warmup + cosine learning rate, values worked out by hand."""

import math

import pytest

from raymoe.train.config import OptimConfig
from raymoe.train.schedule import lr_at


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    total = 14  # decay over steps 4..13, i.e. 9 intervals
    # Warmup: (step + 1) / 4.
    assert [lr_at(s, cfg, total) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # Start of decay: full lr; the last step: the floor 0.1.
    assert lr_at(4, cfg, total) == pytest.approx(1.0)
    assert lr_at(13, cfg, total) == pytest.approx(0.1)
    # Step 8: progress (8 - 4) / 9, lr = 0.1 + 0.9 * (1 + cos(4 pi / 9)) / 2.
    assert lr_at(8, cfg, total) == pytest.approx(0.1 + 0.45 * (1 + math.cos(4 * math.pi / 9)))


def test_no_warmup_starts_at_full_lr():
    cfg = OptimConfig(lr=2e-3, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, cfg, 10) == pytest.approx(2e-3)
    assert lr_at(9, cfg, 10) == pytest.approx(0.0)
