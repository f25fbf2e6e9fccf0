"""Serving dashboard: traffic, latency and engine state of the Serve replicas
(metrics from `raymoe.serve.serve_metrics`; one series per replica process, summed per model)."""

from __future__ import annotations

from raymoe.monitor import metrics as m
from raymoe.monitor.dashboards.panels import CLUSTER, Dashboard, Panel, Row, Target, Variable, sel

_RATE = "[$__rate_interval]"
_ALL = f"rate({sel(m.SERVE_REQUESTS)}{_RATE})"
# `or ... * 0`: with no 5xx at all the ratio reads 0 rather than no data.
_5XX = 'status=~"5.."'
_ERRORS = f"rate({sel(m.SERVE_REQUESTS, _5XX)}{_RATE})"


def _quantiles(spec: m.MetricSpec) -> tuple[Target, ...]:
    bucket = f"rate({sel(spec, part='_bucket')}{_RATE})"
    return tuple(
        Target(f"histogram_quantile({q}, sum by (model, le) ({bucket}))", f"p{label} {{{{model}}}}")
        for q, label in ((0.5, "50"), (0.95, "95"), (0.99, "99"))
    )


TRAFFIC = Row(
    "Traffic",
    (
        Panel(
            "Requests per second",
            "HTTP requests answered, by route and status code.",
            "reqps",
            (
                Target(
                    f"sum by (model, route, status) (rate({sel(m.SERVE_REQUESTS)}{_RATE}))",
                    "{{model}} {{route}} {{status}}",
                ),
            ),
            width=8,
        ),
        Panel(
            "Error ratio",
            "Share of requests answered with a 5xx status.",
            "percentunit",
            (
                Target(
                    f"(sum by (model) ({_ERRORS}) or sum by (model) ({_ALL}) * 0) / sum by (model) ({_ALL})",
                    "{{model}}",
                ),
            ),
            width=8,
        ),
        Panel(
            "Generated tokens per second",
            "Output tokens generated, all replicas.",
            "short",
            (Target(f"sum by (model) (rate({sel(m.SERVE_GENERATED_TOKENS)}{_RATE}))", "{{model}}"),),
            width=8,
        ),
    ),
)

LATENCY = Row(
    "Latency",
    (
        Panel(
            "Time to first token",
            "From request arrival to the first token.",
            "s",
            _quantiles(m.SERVE_TTFT_SECONDS),
            width=8,
        ),
        Panel(
            "Time per output token",
            "Time per output token after the first.",
            "s",
            _quantiles(m.SERVE_TPOT_SECONDS),
            width=8,
        ),
        Panel(
            "End-to-end latency", "Whole request, arrival to last byte.", "s", _quantiles(m.SERVE_E2E_SECONDS), width=8
        ),
    ),
)

ENGINE = Row(
    "Engine",
    (
        Panel(
            "Running and waiting sequences",
            "Sequences in the running batch and waiting for a KV slot, all replicas.",
            "none",
            (
                Target(f"sum by (model) ({sel(m.SERVE_RUNNING_SEQS)})", "running {{model}}"),
                Target(f"sum by (model) ({sel(m.SERVE_WAITING_SEQS)})", "waiting {{model}}"),
            ),
            width=6,
        ),
        Panel(
            "KV cache usage",
            "Fraction of the KV block budget in use: the fullest replica and the mean.",
            "percentunit",
            (
                Target(f"max by (model) ({sel(m.SERVE_KV_CACHE_USAGE)})", "max {{model}}"),
                Target(f"avg by (model) ({sel(m.SERVE_KV_CACHE_USAGE)})", "mean {{model}}"),
            ),
            width=6,
        ),
        Panel(
            "Batch size",
            "Sequences in the last engine step, mean over replicas.",
            "none",
            (Target(f"avg by (model) ({sel(m.SERVE_BATCH_SIZE)})", "{{model}}"),),
            width=6,
        ),
        Panel(
            "Preemptions per second",
            "Sequences preempted because the KV budget was full (recomputed later).",
            "short",
            # The counter exists from a replica's first preemption: until then `or ... * 0` reads 0.
            (
                Target(
                    f"sum by (model) (rate({sel(m.SERVE_PREEMPTIONS)}{_RATE})) or sum by (model) "
                    f"(rate({sel(m.SERVE_GENERATED_TOKENS)}{_RATE})) * 0",
                    "{{model}}",
                ),
            ),
            width=6,
        ),
    ),
)

DASHBOARD = Dashboard(
    uid="raymoe-serving",
    title="raymoe / Serving",
    description="Ray Serve replicas of raymoe's OpenAI-compatible server: traffic, latency, engine "
    "state. Expert load is on the raymoe / Experts dashboard.",
    variables=(
        CLUSTER,
        Variable("model", "Model", m.SERVE_REQUESTS, "model", "Served model name."),
    ),
    rows=(TRAFFIC, LATENCY, ENGINE),
    filters=('model=~"$model"',),
)
