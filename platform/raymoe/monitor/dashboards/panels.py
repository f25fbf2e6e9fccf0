"""Dashboards as Python objects, rendered to Grafana dashboard JSON (schemaVersion 39).

Follows Ray's dashboard panels (`ray/dashboard/modules/metrics/dashboards/common.py`): a dashboard
is a list of rows of panels, each panel a list of PromQL targets, and one shared label filter goes
into every selector. Queries name metrics through `sel(SPEC)`, which writes the placeholder
`{filters}` inside the selector's braces; rendering puts the dashboard's filter there:
`SHARED_FILTER` (the KubeRay cluster, set on every scraped series by KubeRay's PodMonitor) plus the
dashboard's own matchers (`run=~"$run"`, `model=~"$model"`).

`check_dashboard` parses every query and names each metric, label and variable that the platform
does not emit or the dashboard does not define.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from raymoe.monitor.metrics import REGISTRY, MetricSpec, prometheus_name

SCHEMA_VERSION = 39
# KubeRay's PodMonitor copies the pod label `ray.io/cluster` onto every series as `ray_io_cluster`;
# Ray's own dashboards filter on it the same way. Without KubeRay the label is absent and the
# variable's "All" value (`.*`) still matches.
CLUSTER_LABEL = "ray_io_cluster"
SHARED_FILTER = f'{CLUSTER_LABEL}=~"$cluster"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_GRID_WIDTH = 24


@dataclass(frozen=True)
class Target:
    """One PromQL query. `expr` has `{filters}` inside every selector's braces (see `sel`); `legend`
    is a Grafana legend format (`{{label}}`); `dashed` draws the series dashed (thresholds)."""

    expr: str
    legend: str = ""
    dashed: bool = False


@dataclass(frozen=True)
class Panel:
    """One panel. `unit` is a Grafana unit id (`s`, `reqps`, `percentunit`, `none`, ...); `repeat`
    names a variable to repeat the panel over, one copy per selected value."""

    title: str
    description: str
    unit: str
    targets: tuple[Target, ...]
    kind: Literal["timeseries", "stat", "heatmap"] = "timeseries"
    width: int = 12
    height: int = 8
    repeat: str | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    """A query variable: the values of `label` on `metric`'s series; `matchers` narrow them."""

    name: str
    title: str
    metric: MetricSpec | None  # None: the label's values on any series
    label: str
    description: str
    matchers: tuple[str, ...] = (SHARED_FILTER,)
    numeric: bool = False  # sort values as numbers (layer ids), else alphabetically

    def query(self) -> str:
        if self.metric is None:
            return f"label_values({self.label})"
        series = _series_names(self.metric)[0]
        return f"label_values({series}{{{', '.join(self.matchers)}}}, {self.label})"


# Every dashboard's first variable. It reads the label on any series, not on one raymoe metric,
# so a cluster that only trains (or only serves) is listed on every dashboard.
CLUSTER = Variable(
    "cluster",
    "Cluster",
    None,
    CLUSTER_LABEL,
    "KubeRay cluster (pod label ray.io/cluster, copied by KubeRay's PodMonitor).",
    (),
)


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    rows: tuple[Row, ...]
    filters: tuple[str, ...] = ()  # matchers every selector here carries after SHARED_FILTER

    @property
    def label_filter(self) -> str:
        return ", ".join((SHARED_FILTER, *self.filters))

    def exprs(self) -> list[str]:
        """Every panel query with the label filter in place."""
        return [
            t.expr.replace("{filters}", self.label_filter) for row in self.rows for p in row.panels for t in p.targets
        ]


def sel(spec: MetricSpec, *matchers: str, part: str = "") -> str:
    """The selector of `spec`'s exported series with the dashboard filter placeholder, e.g.
    `sel(SERVE_REQUESTS, 'status=~"5.."')` -> `ray_raymoe_serve_requests_total{{filters}, status=~"5.."}`.
    `part` is `_bucket`, `_sum` or `_count` for a histogram."""
    if (spec.kind == "histogram") != bool(part):
        raise ValueError(
            f"{spec.name}: part={part!r}, but a {spec.kind} needs "
            f"{'_bucket/_sum/_count' if spec.kind == 'histogram' else 'none'}"
        )
    return f"{prometheus_name(spec)}{part}{{{', '.join(('{filters}', *matchers))}}}"


def _series_names(spec: MetricSpec) -> list[str]:
    """The names Prometheus stores for `spec` (a histogram is only its bucket/sum/count series)."""
    name = prometheus_name(spec)
    return [f"{name}_bucket", f"{name}_sum", f"{name}_count"] if spec.kind == "histogram" else [name]


def _render_target(target: Target, ref_id: str, label_filter: str) -> dict:
    return {
        "refId": ref_id,
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": target.expr.replace("{filters}", label_filter),
        "legendFormat": target.legend or "__auto",
        "range": True,
        "instant": False,
        "format": "time_series",
    }


def _render_panel(panel: Panel, panel_id: int, pos: dict, label_filter: str) -> dict:
    refs = [chr(ord("A") + i) for i in range(len(panel.targets))]
    out = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": pos,
        "targets": [_render_target(t, r, label_filter) for t, r in zip(panel.targets, refs)],
    }
    dashed = [
        {
            "matcher": {"id": "byFrameRefID", "options": r},
            "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}],
        }
        for t, r in zip(panel.targets, refs)
        if t.dashed
    ]
    if panel.kind == "timeseries":
        out["fieldConfig"] = {
            "defaults": {
                "unit": panel.unit,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 10,
                    "showPoints": "never",
                    "spanNulls": False,
                },
            },
            "overrides": dashed,
        }
        out["options"] = {
            "legend": {
                "showLegend": True,
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "stat":
        out["fieldConfig"] = {"defaults": {"unit": panel.unit}, "overrides": []}
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        }
    else:
        # Each series is one row named by its legend (an expert id), already computed: Grafana must
        # not re-bucket, and "unknown" layout labels rows by name instead of reading bucket bounds.
        out["fieldConfig"] = {"defaults": {"unit": panel.unit}, "overrides": []}
        out["options"] = {
            "calculate": False,
            "cellGap": 1,
            "cellValues": {"unit": panel.unit},
            "color": {
                "mode": "scheme",
                "scheme": "Oranges",
                "scale": "exponential",
                "exponent": 0.5,
                "steps": 64,
                "fill": "dark-orange",
            },
            "yAxis": {"axisPlacement": "left", "axisLabel": "expert"},
            "rowsFrame": {"layout": "unknown"},
            "legend": {"show": True},
            "tooltip": {"mode": "single", "yHistogram": False},
        }
    if panel.repeat:
        out |= {"repeat": panel.repeat, "repeatDirection": "h", "maxPerRow": 4}
    return out


def _render_variable(var: Variable) -> dict:
    query = var.query()
    return {
        "name": var.name,
        "label": var.title,
        "description": var.description,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery", "qryType": 1},
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 3 if var.numeric else 1,
        "hide": 0,
    }


def render(dashboard: Dashboard) -> dict:
    """The Grafana dashboard model (what `POST /api/dashboards/db` takes as `dashboard`)."""
    panels, panel_id, y = [], 0, 0
    for row in dashboard.rows:
        panel_id += 1
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": _GRID_WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        y, x, row_height = y + 1, 0, 0
        for panel in row.panels:
            if x + panel.width > _GRID_WIDTH:
                y, x, row_height = y + row_height, 0, 0
            panel_id += 1
            pos = {"h": panel.height, "w": panel.width, "x": x, "y": y}
            panels.append(_render_panel(panel, panel_id, pos, dashboard.label_filter))
            x, row_height = x + panel.width, max(row_height, panel.height)
        y += row_height
    datasource = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "options": [],
        "refresh": 1,
        "regex": "",
        "hide": 0,
        "includeAll": False,
        "multi": False,
    }
    return {
        "id": None,
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["raymoe"],
        "editable": True,
        "schemaVersion": SCHEMA_VERSION,
        "graphTooltip": 1,
        "timezone": "browser",
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": [datasource, *(_render_variable(v) for v in dashboard.variables)]},
        "panels": panels,
    }


_SPECS_BY_SERIES = {series: spec for spec in REGISTRY for series in _series_names(spec)}
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\{([^{}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*""')
_GROUPING = re.compile(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*(\(|\{)?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right"}
_VARIABLE = re.compile(r"\$\{?(\w+)")


def _metric_names(query: str) -> list[tuple[str, bool]]:
    """Each metric name in a PromQL (or label_values) query, and whether a selector `{...}` follows
    it: what is left once strings, matchers, ranges, grouping clauses, functions and keywords are
    set aside."""
    text = re.sub(r"\{[^{}]*\}", "{}", _QUOTED.sub('""', query))
    text = _GROUPING.sub("", re.sub(r"\[[^\]]*\]", "", text))
    text = re.sub(r"label_values\((.*?)(?:,\s*)?\w+\)$", r"(\1)", text)  # drop the label argument
    return [
        (m.group(1), m.group(2) == "{")
        for m in _IDENTIFIER.finditer(text)
        if m.group(2) != "(" and m.group(1) not in _KEYWORDS
    ]


def _check_query(query: str, label_filter: str, defined: set[str]) -> list[str]:
    problems, allowed = [], {"le", CLUSTER_LABEL}
    for name, is_selector in _metric_names(query):
        if name not in _SPECS_BY_SERIES:
            problems.append(f"{name!r} is not a series of any metric in metrics.REGISTRY")
        elif not is_selector:
            problems.append(f"{name!r} is used without a selector, so without the shared filter")
    for name, body in _SELECTOR.findall(query):
        if (spec := _SPECS_BY_SERIES.get(name)) is None:
            continue
        labels = {CLUSTER_LABEL, *spec.tag_keys} | ({"le"} if name.endswith("_bucket") else set())
        allowed |= labels
        problems += [
            f"{name!r} has no label {lbl!r} (its labels: {sorted(labels)})"
            for lbl in _MATCHER.findall(_QUOTED.sub('""', body))
            if lbl not in labels
        ]
        if label_filter and label_filter not in body:
            problems.append(f"{name!r} selector lacks the shared filter {label_filter!r}")
    grouped = [lbl.strip() for group in _GROUPING.findall(_QUOTED.sub('""', query)) for lbl in group.split(",")]
    if match := re.fullmatch(r"label_values\((?:.*,)?\s*(\w+)\)", query):
        grouped.append(match.group(1))
    problems += [f"label {lbl!r} is on none of the query's metrics" for lbl in grouped if lbl and lbl not in allowed]
    problems += [
        f"variable ${v} is not defined" for v in _VARIABLE.findall(query) if not v.startswith("__") and v not in defined
    ]
    return [f"{p} in: {query}" for p in problems]


def check_dashboard(dashboard: Dashboard) -> list[str]:
    """Problems with `dashboard`'s queries: a series no registry metric exports, a label its metric
    does not carry, a selector without the shared filter, an undefined variable. Empty when sound."""
    defined = {"datasource", *(v.name for v in dashboard.variables)}
    problems = [p for e in dashboard.exprs() for p in _check_query(e, dashboard.label_filter, defined)]
    for var in dashboard.variables:
        problems += _check_query(var.query(), "", defined - {var.name})
    for row in dashboard.rows:
        for panel in row.panels:
            if not panel.targets:
                problems.append(f"panel {panel.title!r} has no query")
            if panel.repeat and panel.repeat not in defined:
                problems.append(f"panel {panel.title!r} repeats over undefined ${panel.repeat}")
            problems += [
                f"variable ${v} in title {panel.title!r} is not defined"
                for v in _VARIABLE.findall(panel.title)
                if v not in defined
            ]
    return [f"{dashboard.uid}: {p}" for p in problems]
