"""Prometheus alert rules for raymoe, built from the metric specs in `metrics.py` and rendered to
one rule file (`dashboards/alerts/raymoe-alerts.rules.yml`).

Every metric name in an expression comes from `prometheus_name(spec)`, so a renamed metric changes
the rules with it; `check_rules_reference_registry` parses each expression and refuses names that
are neither in `metrics.REGISTRY` nor Prometheus' own scrape series (`up`, ...). Ray exports one
series per worker process and adds labels of its own (SessionName, WorkerId, instance, job, ...),
so every rule aggregates `by` the labels it needs: a restarted worker then neither resets `for:`
nor splits one alert into several.

Rule format, `for:`, labels and annotation templates follow the Prometheus docs:
https://prometheus.io/docs/prometheus/latest/configuration/alerting_rules/ and
https://prometheus.io/docs/prometheus/latest/configuration/template_reference/ ; the tests run
`promtool check rules` and `promtool test rules`
(https://prometheus.io/docs/prometheus/latest/configuration/unit_testing_rules/). What each alert
means and what to do: docs/alerts.md.

Generate: python -m raymoe.monitor.alerts --out dashboards/alerts/raymoe-alerts.rules.yml
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from raymoe.atomic_io import atomic_write_bytes
from raymoe.monitor import metrics as m

# --- thresholds (each is the alert's only knob; docs/alerts.md repeats them) ------------------
# Interactive chat: a silent wait past ~2 s reads as "hung". 2.0 lies inside the TTFT histogram's
# (1.0, 2.5] bucket (metrics._LATENCY_S), so the p99 is linearly interpolated there.
TTFT_P99_SLO_S = 2.0
# Max over mean tokens per expert (1 = balanced). At 2 the hottest expert does twice its share:
# under expert parallelism every all-to-all waits for it, so MoE layers run at <= 1/2 of balanced
# speed, and with a capacity factor below 2 (GShard / Switch use 1.25-2) tokens are being dropped.
EXPERT_IMBALANCE_BOUND = 2.0
# Rising loss = loss over its own 1 h minimum, not deriv() > 0: near a plateau the slope of a noisy
# loss is positive about half the time, while 1.2x the minimum is a real divergence (or a loss spike
# that did not recover within `for:`), whatever the loss' scale.
LOSS_RISE_RATIO = 1.2
# 5xx share of requests over 5m: a replica restarted by its health check answers a few 503s, far
# under 5% of 5 minutes' traffic; 1 failure in 20 requests is what users notice as an outage.
ERROR_RATIO_BOUND = 0.05
# Rejected silo updates in 15 min: an occasional late or failed silo is absorbed (the round goes on
# while the quorum holds); more than 5 is one silo rejected round after round, several at once, or
# poisoning. Debug runs with rounds of seconds can cross it on one flaky silo.
FEDERATED_REJECTED_15M = 5

RUNBOOK = "docs/alerts.md"
# Series Prometheus writes for every scrape itself; rules may use them without a MetricSpec.
PROMETHEUS_BUILTINS = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)

VALUE_0F = '{{ $value | printf "%.0f" }}'
VALUE_2F = '{{ $value | printf "%.2f" }}'
VALUE_PCT = "{{ $value | humanizePercentage }}"
VALUE_S = "{{ $value | humanizeDuration }}"


def _lbl(name: str) -> str:
    return "{{ $labels." + name + " }}"


@dataclass(frozen=True)
class AlertRule:
    """One alerting rule. `for_` is a Prometheus duration ("5m"); `severity` warning|critical."""

    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    def to_dict(self) -> dict:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": {
                "summary": self.summary,
                "description": f"{self.description} Held for {self.for_}.",
                "runbook_url": f"{RUNBOOK}#{self.name.lower()}",
            },
        }


def build_groups(ttft_slo_s: float = TTFT_P99_SLO_S) -> dict[str, list[AlertRule]]:
    """The rules by group name.

    Args:
        ttft_slo_s: p99 time-to-first-token objective, seconds.
    """
    drift = m.prometheus_name(m.DRIFT_ALARM)
    ttft = m.prometheus_name(m.SERVE_TTFT_SECONDS) + "_bucket"
    per_expert = m.prometheus_name(m.SERVE_TOKENS_PER_EXPERT)
    imbalance = m.prometheus_name(m.TRAIN_LOAD_IMBALANCE)
    loss = m.prometheus_name(m.TRAIN_LOSS)
    requests = m.prometheus_name(m.SERVE_REQUESTS)
    rejected = m.prometheus_name(m.FEDERATED_REJECTED_UPDATES)
    # Summed over replicas first: max/avg across per-replica series would measure replicas too.
    expert_rate = f"sum by (model, layer, expert) (rate({per_expert}[5m]))"
    return {
        "raymoe-drift": [
            AlertRule(
                "RaymoeDriftAlarm",
                f"max by (run, detector, feature) ({drift}) == 1",
                "10m",
                "warning",
                f"Drift on feature {_lbl('feature')} of run {_lbl('run')}",
                f"The {_lbl('detector')} detector has been over its threshold on feature {_lbl('feature')}"
                f" of run {_lbl('run')}.",
            )
        ],
        "raymoe-serve": [
            AlertRule(
                "RaymoeServeTTFTP99OverSLO",
                f"histogram_quantile(0.99, sum by (le, model) (rate({ttft}[5m]))) > {ttft_slo_s:g}",
                "5m",
                "warning",
                f"p99 time to first token of {_lbl('model')} is over {ttft_slo_s:g}s",
                f"p99 TTFT of model {_lbl('model')} is {VALUE_S} over the last 5m (SLO {ttft_slo_s:g}s).",
            ),
            AlertRule(
                "RaymoeServeErrorRatio",
                f'sum by (model) (rate({requests}{{status=~"5.."}}[5m]))'
                f" / sum by (model) (rate({requests}[5m])) > {ERROR_RATIO_BOUND:g}",
                "5m",
                "critical",
                f"Model {_lbl('model')} answers {VALUE_PCT} of requests with 5xx",
                f"{VALUE_PCT} of requests to model {_lbl('model')} failed with a 5xx status over the"
                f" last 5m (bound {ERROR_RATIO_BOUND:.0%}).",
            ),
            AlertRule(
                "RaymoeServeExpertImbalance",
                f"max by (model, layer) ({expert_rate}) / avg by (model, layer) ({expert_rate})"
                f" > {EXPERT_IMBALANCE_BOUND:g}",
                "15m",
                "warning",
                f"Expert load imbalance in layer {_lbl('layer')} of {_lbl('model')}",
                f"The busiest expert of MoE layer {_lbl('layer')} of model {_lbl('model')} routes"
                f" {VALUE_2F}x the mean tokens per expert (bound {EXPERT_IMBALANCE_BOUND:g}x).",
            ),
        ],
        "raymoe-train": [
            AlertRule(
                "RaymoeTrainExpertImbalance",
                f"max by (run, layer) ({imbalance}) > {EXPERT_IMBALANCE_BOUND:g}",
                "15m",
                "warning",
                f"Expert load imbalance in layer {_lbl('layer')} of run {_lbl('run')}",
                f"Max over mean tokens per expert in MoE layer {_lbl('layer')} of training run"
                f" {_lbl('run')} is {VALUE_2F} (bound {EXPERT_IMBALANCE_BOUND:g}).",
            ),
            # NaN != NaN is the only comparison NaN passes; count, not max, because max skips NaN.
            AlertRule(
                "RaymoeTrainLossNotFinite",
                f"count by (run) (({loss} != {loss}) or ({loss} == Inf))",
                "1m",
                "critical",
                f"Training loss of run {_lbl('run')} is NaN or infinite",
                f"The training loss of run {_lbl('run')} is NaN or infinite:"
                " the run has diverged and every later step is wasted.",
            ),
            AlertRule(
                "RaymoeTrainLossRising",
                f"max by (run) ({loss} / min_over_time({loss}[1h])) > {LOSS_RISE_RATIO:g}",
                "15m",
                "warning",
                f"Training loss of run {_lbl('run')} is rising",
                f"The training loss of run {_lbl('run')} is {VALUE_2F}x its minimum of the last hour"
                f" (bound {LOSS_RISE_RATIO:g}x).",
            ),
        ],
        "raymoe-federated": [
            AlertRule(
                "RaymoeFederatedRejectedUpdates",
                f"sum by (run) (increase({rejected}[15m])) > {FEDERATED_REJECTED_15M}",
                "5m",
                "warning",
                f"Federated run {_lbl('run')} is rejecting silo updates",
                f"About {VALUE_0F} silo updates of federated run {_lbl('run')} were rejected in the last 15m"
                f" (bound {FEDERATED_REJECTED_15M}).",
            )
        ],
        "raymoe-targets": [
            AlertRule(
                "RaymoeTargetDown",
                "up == 0",
                "2m",
                "warning",
                f"Scrape target {_lbl('instance')} of job {_lbl('job')} is down",
                f"Prometheus cannot scrape {_lbl('instance')} (job {_lbl('job')}):"
                " its metrics, and the alerts on them, are blind.",
            )
        ],
    }


def render(groups: dict[str, list[AlertRule]] | None = None) -> str:
    """The Prometheus rule file (YAML) for `groups` (default: `build_groups()`)."""
    groups = build_groups() if groups is None else groups
    doc = {"groups": [{"name": name, "rules": [r.to_dict() for r in rules]} for name, rules in groups.items()]}
    header = (
        "# Generated by `python -m raymoe.monitor.alerts` from raymoe/monitor/metrics.py;"
        " do not edit.\n# Runbook: docs/alerts.md\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, width=1000, allow_unicode=True)


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "nan",
        "inf",
    }
)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels, durations and
    numbers excluded). Selectors written as `{__name__="..."}` are not seen."""
    for pattern in (_STRINGS, _MATCHERS, _RANGES, _LABEL_LISTS):
        expr = pattern.sub(" ", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        if match.group().lower() in _KEYWORDS or expr[match.end() :].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names


def registry_series() -> set[str]:
    """Every series name the registry's metrics export (histograms as _bucket, _sum, _count)."""
    names = set()
    for spec in m.REGISTRY:
        base = m.prometheus_name(spec)
        names.update([f"{base}_bucket", f"{base}_sum", f"{base}_count"] if spec.kind == "histogram" else [base])
    return names


def check_rules_reference_registry(groups: dict[str, list[AlertRule]] | None = None) -> set[str]:
    """Checks that every metric an expression names is exported by `metrics.REGISTRY` or is a
    Prometheus built-in.

    Returns:
        the metric names the rules use.

    Raises:
        ValueError: naming each rule and the unknown metric it uses.
    """
    groups = build_groups() if groups is None else groups
    known = registry_series() | PROMETHEUS_BUILTINS
    used, unknown = set(), []
    for rules in groups.values():
        for rule in rules:
            names = metric_names(rule.expr)
            used |= names
            unknown += [f"{rule.name}: {n}" for n in sorted(names - known)]
    if unknown:
        raise ValueError("alert rules use metrics missing from raymoe.monitor.metrics.REGISTRY: " + "; ".join(unknown))
    return used


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write raymoe's Prometheus alert rules.")
    parser.add_argument("--out", required=True, type=Path, help="rule file to write (YAML)")
    args = parser.parse_args(argv)
    check_rules_reference_registry()
    atomic_write_bytes(args.out, render().encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
