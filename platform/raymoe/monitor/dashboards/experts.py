"""Experts dashboard: how routed tokens spread over the experts of each MoE layer, in training and
in serving. Placement decisions (which experts to replicate, EPLB-style) start here.

Load of an expert = tokens routed to it (training: `raymoe_train_tokens_per_expert`, a gauge of the
last step, summed over workers; serving: `raymoe_serve_tokens_per_expert`, a counter, as a rate).
An expert is *hot* when its load over `_WINDOW` exceeds twice its layer's mean; *turnover* is the
share of a layer's hot experts that were not hot `_LOOKBACK` earlier (0 = a stable hot set that
replicas can be placed for, 1 = all new). The platform emits no metric for redundant expert copies,
so this dashboard shows none.
"""

from __future__ import annotations

from collections.abc import Callable

from raymoe.monitor import metrics as m
from raymoe.monitor.dashboards.panels import (
    CLUSTER,
    SHARED_FILTER,
    Dashboard,
    Panel,
    Row,
    Target,
    Variable,
    sel,
)

_WINDOW = "10m"  # load is averaged over this much time before deciding what is hot
_LOOKBACK = "1h"  # turnover compares the hot set now with the one this long ago
_RUN, _MODEL = 'run=~"$run"', 'model=~"$model"'
_TRAIN_LAYER, _SERVE_LAYER = 'layer=~"$train_layer"', 'layer=~"$serve_layer"'


def _train_load(window: str, offset: str = "") -> str:
    shift = f" offset {offset}" if offset else ""
    return f"max by (run, layer, expert) (avg_over_time({sel(m.TRAIN_TOKENS_PER_EXPERT, _RUN)}[{window}]{shift}))"


def _serve_load(window: str, offset: str = "") -> str:
    shift = f" offset {offset}" if offset else ""
    return f"sum by (model, layer, expert) (rate({sel(m.SERVE_TOKENS_PER_EXPERT, _MODEL)}[{window}]{shift}))"


def _hot(load: str, group: str) -> str:
    """The experts of `load` above twice their layer's mean (`group` = the layer's labels)."""
    return f"({load} > on ({group}) group_left avg by ({group}) ({load}) * 2)"


def _turnover(load: Callable[..., str], group: str) -> Target:
    now, before = _hot(load(_WINDOW), group), _hot(load(_WINDOW, _LOOKBACK), group)
    # `or ... * 0`: a layer whose hot experts were all hot before reads 0, not no data.
    newly_hot = f"count by ({group}) ({now} unless on ({group}, expert) {before})"
    return Target(
        f"({newly_hot} or count by ({group}) ({now}) * 0) / count by ({group}) ({now})",
        "{{" + group.split(",")[0] + "}} layer {{layer}}",
    )


def _heatmap(title: str, load: str, variable: str) -> Panel:
    return Panel(
        f"{title}, layer ${variable}",
        "Load of each expert (y) over time, relative to the layer's mean: 1 = balanced, "
        "2 = twice its fair share. One panel per selected layer.",
        "none",
        (Target(f"{load} / on () group_left avg({load})", "{{expert}}"),),
        kind="heatmap",
        width=24,
        height=9,
        repeat=variable,
    )


TRAINING = Row(
    "Training routing",
    (
        Panel(
            "Load imbalance",
            "Max over mean tokens per expert in each MoE layer, last step (1 = balanced).",
            "none",
            (Target(f"max by (run, layer) ({sel(m.TRAIN_LOAD_IMBALANCE, _RUN)})", "{{run}} layer {{layer}}"),),
        ),
        Panel(
            "Hot-expert turnover",
            f"Share of each layer's hot experts (load over {_WINDOW} above twice "
            f"the layer mean) that were not hot {_LOOKBACK} earlier.",
            "percentunit",
            (_turnover(_train_load, "run, layer"),),
        ),
        _heatmap(
            "Training load", f"max by (expert) ({sel(m.TRAIN_TOKENS_PER_EXPERT, _RUN, _TRAIN_LAYER)})", "train_layer"
        ),
    ),
)

_SERVE_NOW = _serve_load("$__rate_interval")
_SERVE_HEAT = sel(m.SERVE_TOKENS_PER_EXPERT, _MODEL, _SERVE_LAYER)
SERVING = Row(
    "Serving routing",
    (
        Panel(
            "Load imbalance",
            "Max over mean routed tokens per second per expert in each MoE layer. "
            "Experts that received no token since the replica started have no series and are left "
            "out of the mean, so this can read low on a cold replica.",
            "none",
            (
                Target(
                    f"max by (model, layer) ({_SERVE_NOW}) / avg by (model, layer) ({_SERVE_NOW})",
                    "{{model}} layer {{layer}}",
                ),
            ),
        ),
        Panel(
            "Hot-expert turnover",
            f"Share of each layer's hot experts (load over {_WINDOW} above twice "
            f"the layer mean) that were not hot {_LOOKBACK} earlier.",
            "percentunit",
            (_turnover(_serve_load, "model, layer"),),
        ),
        Panel(
            "Expert copies",
            "Physical copies of each logical expert in the serving placement, the "
            "most any replica has (1 = no redundant copy; EPLB re-placement gives hot experts more). "
            "One placement serves every MoE layer.",
            "none",
            (Target(f"max by (model, expert) ({sel(m.SERVE_EXPERT_COPIES, _MODEL)})", "{{model}} expert {{expert}}"),),
        ),
        _heatmap("Serving load", f"sum by (expert) (rate({_SERVE_HEAT}[$__rate_interval]))", "serve_layer"),
    ),
)

DASHBOARD = Dashboard(
    uid="raymoe-experts",
    title="raymoe / Experts",
    description="Routed load per expert and MoE layer, in training and serving: imbalance, hot-expert "
    "turnover, redundant expert copies, per-layer load heatmaps.",
    variables=(
        CLUSTER,
        Variable("run", "Run", m.TRAIN_TOKENS_PER_EXPERT, "run", "Training run (the job config's name)."),
        Variable("model", "Model", m.SERVE_TOKENS_PER_EXPERT, "model", "Served model name."),
        Variable(
            "train_layer",
            "Layer (training)",
            m.TRAIN_TOKENS_PER_EXPERT,
            "layer",
            "MoE layers of the selected runs: one training heatmap each.",
            (SHARED_FILTER, _RUN),
            numeric=True,
        ),
        Variable(
            "serve_layer",
            "Layer (serving)",
            m.SERVE_TOKENS_PER_EXPERT,
            "layer",
            "MoE layers of the selected models: one serving heatmap each.",
            (SHARED_FILTER, _MODEL),
            numeric=True,
        ),
    ),
    rows=(TRAINING, SERVING),
)
