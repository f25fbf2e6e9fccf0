"""Federated fine-tuning dashboard: rounds, silo participation and rejections, update norms, the
global adapter's held-out loss and the differential-privacy budget spent (metrics from
`raymoe.federated.server`)."""

from __future__ import annotations

from raymoe.monitor import metrics as m
from raymoe.monitor.dashboards.panels import CLUSTER, Dashboard, Panel, Row, Target, Variable, sel

# A round takes seconds to minutes and observes one norm per silo: the usual rate window would hold
# too few observations for a quantile.
_NORM_WINDOW = "15m"


def _per_run(spec: m.MetricSpec) -> Target:
    return Target(f"max by (run) ({sel(spec)})", "{{run}}")


_NORM_BUCKET = f"rate({sel(m.FEDERATED_UPDATE_NORM, part='_bucket')}[{_NORM_WINDOW}])"

ROUNDS = Row(
    "Rounds",
    (
        Panel("Round", "Federated rounds completed.", "none", (_per_run(m.FEDERATED_ROUND),), width=6),
        Panel(
            "Participants",
            "Silos whose update was aggregated in the last round.",
            "none",
            (_per_run(m.FEDERATED_PARTICIPANTS),),
            width=6,
        ),
        Panel(
            "Rejected updates by reason",
            "Silo updates rejected (non_finite, wrong_shape, norm_exceeded, ...), failed or late, per graph interval.",
            "none",
            (
                Target(
                    f"sum by (run, reason) (increase({sel(m.FEDERATED_REJECTED_UPDATES)}[$__rate_interval]))",
                    "{{run}} {{reason}}",
                ),
            ),
        ),
    ),
)

UPDATES = Row(
    "Updates, quality and privacy",
    (
        Panel(
            "Update norm",
            f"L2 norm of a silo's adapter update before clipping: quantiles over the last {_NORM_WINDOW}.",
            "none",
            tuple(
                Target(f"histogram_quantile({q}, sum by (run, le) ({_NORM_BUCKET}))", f"p{p} {{{{run}}}}")
                for q, p in ((0.5, "50"), (0.9, "90"), (0.99, "99"))
            ),
            width=8,
        ),
        Panel(
            "Global eval loss",
            "Held-out answer loss of the global adapter after each round.",
            "none",
            (_per_run(m.FEDERATED_EVAL_LOSS),),
            width=8,
        ),
        Panel(
            "Privacy budget (epsilon)",
            "Differential-privacy epsilon spent so far, at the run's delta.",
            "none",
            (_per_run(m.FEDERATED_EPSILON),),
            width=8,
        ),
    ),
)

DASHBOARD = Dashboard(
    uid="raymoe-federated",
    title="raymoe / Federated",
    description="Federated LoRA fine-tuning: rounds, participation, rejected updates, update norms, "
    "global eval loss and the privacy budget.",
    variables=(
        CLUSTER,
        Variable("run", "Run", m.FEDERATED_ROUND, "run", "Federated run (the job config's name)."),
    ),
    rows=(ROUNDS, UPDATES),
    filters=('run=~"$run"',),
)
