"""Grafana dashboards for raymoe, one module per dashboard, rendered from the metric registry.

`DASHBOARDS` maps a file stem to its dashboard; `grafana_push.export` writes them as JSON and
`grafana_push.push` uploads them to a Grafana server.
"""

from __future__ import annotations

from raymoe.monitor.dashboards import drift, experts, federated, serving, training
from raymoe.monitor.dashboards.panels import Dashboard, check_dashboard, render

DASHBOARDS: dict[str, Dashboard] = {
    "training": training.DASHBOARD,
    "serving": serving.DASHBOARD,
    "experts": experts.DASHBOARD,
    "drift": drift.DASHBOARD,
    "federated": federated.DASHBOARD,
}


def check_queries_reference_registry() -> None:
    """Raises ValueError naming every query that uses a series not in `metrics.REGISTRY`, a label
    its metric does not carry, a selector without the shared filter, or an undefined variable."""
    problems = [p for d in DASHBOARDS.values() for p in check_dashboard(d)]
    if problems:
        raise ValueError("dashboard queries do not match the metric registry:\n  " + "\n  ".join(problems))


def rendered() -> dict[str, dict]:
    """Every dashboard's Grafana JSON model by file stem, after the registry check."""
    check_queries_reference_registry()
    return {name: render(d) for name, d in DASHBOARDS.items()}


__all__ = ["DASHBOARDS", "check_queries_reference_registry", "rendered"]
