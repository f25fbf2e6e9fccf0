"""Training dashboard: progress, throughput, expert-parallel communication and checkpoints of Ray
Train runs (metrics from `raymoe.train.loop`; the gauges are set by rank 0, so `max by (run)` only
folds the stale series a restarted worker leaves behind)."""

from __future__ import annotations

from raymoe.monitor import metrics as m
from raymoe.monitor.dashboards.panels import CLUSTER, Dashboard, Panel, Row, Target, Variable, sel

# Checkpoints are minutes apart: a quantile over the usual rate window would be empty most of the time.
_CHECKPOINT_WINDOW = "1h"


def _per_run(spec: m.MetricSpec) -> Target:
    return Target(f"max by (run) ({sel(spec)})", "{{run}}")


PROGRESS = Row(
    "Progress",
    (
        Panel("Step", "Optimizer steps completed.", "none", (_per_run(m.TRAIN_STEP),), width=6),
        Panel(
            "Loss", "Cross-entropy of the last step, mean over all workers.", "none", (_per_run(m.TRAIN_LOSS),), width=6
        ),
        Panel("Learning rate", "Learning rate of the last step.", "none", (_per_run(m.TRAIN_LR),), width=6),
        Panel(
            "Gradient norm", "Global gradient norm before clipping.", "none", (_per_run(m.TRAIN_GRAD_NORM),), width=6
        ),
    ),
)

THROUGHPUT = Row(
    "Throughput",
    (
        Panel(
            "Tokens per second",
            "Training tokens per second, all workers.",
            "short",
            (_per_run(m.TRAIN_TOKENS_PER_SECOND),),
            width=6,
        ),
        Panel(
            "MFU",
            "Model FLOPs utilisation: 6 x active params x tokens/s over the configured peak "
            "(only when peak_tflops_per_worker is set).",
            "percentunit",
            (_per_run(m.TRAIN_MFU),),
            width=6,
        ),
        Panel(
            "All-to-all bytes per second",
            "Bytes each rank sends to its expert-parallel peers (forward dispatch + combine); nothing when ep=1.",
            "Bps",
            (
                Target(
                    f"sum by (run, rank) (rate({sel(m.TRAIN_ALL_TO_ALL_BYTES)}[$__rate_interval]))",
                    "{{run}} rank {{rank}}",
                ),
            ),
            width=6,
        ),
        Panel(
            "Time in all-to-all",
            "Fraction of wall time each rank spends in forward all-to-alls (seconds per second).",
            "percentunit",
            (
                Target(
                    f"sum by (run, rank) (rate({sel(m.TRAIN_ALL_TO_ALL_SECONDS)}[$__rate_interval]))",
                    "{{run}} rank {{rank}}",
                ),
            ),
            width=6,
        ),
    ),
)

_CKPT_BUCKET = f"rate({sel(m.TRAIN_CHECKPOINT_SECONDS, part='_bucket')}[{_CHECKPOINT_WINDOW}])"
CHECKPOINTS = Row(
    "Checkpoints",
    (
        Panel(
            "Checkpoint write time",
            f"Seconds to write one sharded checkpoint: quantiles and mean over the last {_CHECKPOINT_WINDOW}.",
            "s",
            (
                Target(f"histogram_quantile(0.5, sum by (run, le) ({_CKPT_BUCKET}))", "p50 {{run}}"),
                Target(f"histogram_quantile(0.95, sum by (run, le) ({_CKPT_BUCKET}))", "p95 {{run}}"),
                Target(
                    f"sum by (run) (increase({sel(m.TRAIN_CHECKPOINT_SECONDS, part='_sum')}"
                    f"[{_CHECKPOINT_WINDOW}])) / sum by (run) (increase("
                    f"{sel(m.TRAIN_CHECKPOINT_SECONDS, part='_count')}[{_CHECKPOINT_WINDOW}]))",
                    "mean {{run}}",
                ),
            ),
        ),
        # The histogram's own count, not increase(): Ray exports a histogram from its first
        # observation on, so increase() never sees the first checkpoint of a run.
        Panel(
            "Checkpoints written",
            "Checkpoints the run's current workers have written.",
            "none",
            (Target(f"sum by (run) ({sel(m.TRAIN_CHECKPOINT_SECONDS, part='_count')})", "{{run}}"),),
        ),
    ),
)

DASHBOARD = Dashboard(
    uid="raymoe-training",
    title="raymoe / Training",
    description="Ray Train runs of raymoe: progress, throughput, all-to-all traffic, checkpoints. "
    "Expert load is on the raymoe / Experts dashboard.",
    variables=(
        CLUSTER,
        Variable("run", "Run", m.TRAIN_STEP, "run", "Training run (the job config's name)."),
    ),
    rows=(PROGRESS, THROUGHPUT, CHECKPOINTS),
    filters=('run=~"$run"',),
)
