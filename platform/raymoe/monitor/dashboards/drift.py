"""Drift and quality dashboard: per-feature drift statistics against their alarm thresholds, and the
served model's held-out perplexity over time (metrics from `pipelines.drift`)."""

from __future__ import annotations

from raymoe.monitor import metrics as m
from raymoe.monitor.dashboards.panels import CLUSTER, Dashboard, Panel, Row, Target, Variable, sel

_BY = "run, detector, feature"
_LEGEND = "{{run}} {{feature}} ({{detector}})"
_MODEL = 'model=~"$model"'


def _latest(spec: m.MetricSpec, by: str = _BY, *matchers: str) -> str:
    return f"max by ({by}) ({sel(spec, *matchers)})"


DRIFT = Row("Drift", (
    Panel("Features in alarm", "Features whose detector is over its threshold now.", "none",
          (Target(f"sum({_latest(m.DRIFT_ALARM)}) or vector(0)", "in alarm"),), kind="stat", width=6),
    Panel("Drift score over threshold", "Each feature's drift statistic divided by its detector's "
          "threshold: 1 is the alarm line, whatever the detector's scale (PSI, KS, MMD, ...).", "none",
          (Target(f"{_latest(m.DRIFT_SCORE)} / {_latest(m.DRIFT_THRESHOLD)}", _LEGEND),), width=18),
    Panel("Drift score and threshold", "The raw statistic of the last check (solid) and the "
          "configured alarm threshold (dashed).", "none", (
              Target(_latest(m.DRIFT_SCORE), _LEGEND),
              Target(_latest(m.DRIFT_THRESHOLD), "threshold " + _LEGEND, dashed=True),
          )),
    Panel("Alarm by feature", "1 while the feature's detector is over its threshold, else 0.", "none",
          (Target(_latest(m.DRIFT_ALARM), _LEGEND),)),
))

QUALITY = Row("Quality", (
    Panel("Held-out perplexity", "Perplexity of the served model on the fixed evaluation set.", "none",
          (Target(_latest(m.QUALITY_PERPLEXITY, "run, model", _MODEL), "{{run}} {{model}}"),)),
    Panel("Quality decay", "Held-out perplexity over its first recorded point (1 = no decay, "
          "1.1 = 10% worse).", "none",
          (Target(_latest(m.QUALITY_DECAY, "run, model", _MODEL), "{{run}} {{model}}"),)),
))

DASHBOARD = Dashboard(
    uid="raymoe-drift",
    title="raymoe / Drift and quality",
    description="Input drift per feature and detector against its alarm threshold, and held-out "
                "quality of the served model.",
    variables=(
        CLUSTER,
        Variable("run", "Run", m.DRIFT_SCORE, "run", "Drift-monitoring run (the job config's name)."),
        Variable("model", "Model", m.QUALITY_PERPLEXITY, "model", "Model whose quality is tracked."),
    ),
    rows=(DRIFT, QUALITY),
    filters=('run=~"$run"',),
)
