"""Drift and quality dashboard: per-feature drift statistics against their alarm thresholds, and the
served model's held-out perplexity over time (metrics from `pipelines.drift`)."""

from __future__ import annotations

from raymoe.monitor import metrics as m
from raymoe.monitor.dashboards.panels import CLUSTER, Dashboard, Panel, Row, Target, Variable, sel

_BY = "run, detector, feature"
_LEGEND = "{{run}} {{feature}} ({{detector}})"
_MODEL = 'model=~"$model"'
_DISTANCES = 'detector=~"psi|wasserstein|js"'
_TESTS = 'detector=~"chi2|ks|mmd"'


def _latest(spec: m.MetricSpec, by: str = _BY, *matchers: str) -> str:
    return f"max by ({by}) ({sel(spec, *matchers)})"


DRIFT = Row(
    "Drift",
    (
        Panel(
            "Features in alarm",
            "Features whose detector is over its threshold now.",
            "none",
            (Target(f"sum({_latest(m.DRIFT_ALARM)}) or vector(0)", "in alarm"),),
            kind="stat",
            width=6,
        ),
        Panel(
            "Distance over threshold",
            "Distance detectors (PSI, Wasserstein, Jensen-Shannon): the "
            "statistic divided by its threshold, so 1 is the alarm line whatever the scale.",
            "none",
            (
                Target(
                    f"{_latest(m.DRIFT_SCORE, _BY, _DISTANCES)} / {_latest(m.DRIFT_THRESHOLD, _BY, _DISTANCES)}",
                    _LEGEND,
                ),
            ),
            width=18,
        ),
        Panel(
            "Test p-values",
            "Test detectors (chi-square, KS, MMD): the p-value of the last check "
            "(solid) and the significance level (dashed); an alarm is a p-value below its line.",
            "none",
            (
                Target(_latest(m.DRIFT_P_VALUE), _LEGEND),
                Target(_latest(m.DRIFT_THRESHOLD, _BY, _TESTS), "alpha " + _LEGEND, dashed=True),
            ),
        ),
        Panel(
            "Drift statistic",
            "The raw statistic of the last check of every detector, in its own "
            "unit (PSI, chi-square, KS D, Wasserstein in reference std, JS distance, MMD^2).",
            "none",
            (Target(_latest(m.DRIFT_SCORE), _LEGEND),),
        ),
        Panel(
            "Alarm by feature",
            "1 while the feature's detector is over its threshold, else 0.",
            "none",
            (Target(_latest(m.DRIFT_ALARM), _LEGEND),),
        ),
    ),
)

QUALITY = Row(
    "Quality",
    (
        Panel(
            "Held-out perplexity",
            "Perplexity of the served model on the fixed evaluation set.",
            "none",
            (Target(_latest(m.QUALITY_PERPLEXITY, "run, model", _MODEL), "{{run}} {{model}}"),),
        ),
        Panel(
            "Quality decay",
            "Held-out perplexity over its first recorded point (1 = no decay, 1.1 = 10% worse).",
            "none",
            (Target(_latest(m.QUALITY_DECAY, "run, model", _MODEL), "{{run}} {{model}}"),),
        ),
    ),
)

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
