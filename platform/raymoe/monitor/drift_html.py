"""The drift job's report: one self-contained HTML page (no external CSS, JS or images) that opens
offline, attaches to a ticket, and survives being mailed.

It shows the verdict, the job's metadata, a table of every (feature, detector) result of
`raymoe.monitor.drift.summary()`, and plots comparing the reference and current windows (windows
as documented in `raymoe.monitor.drift`): length and mean-logprob histograms on shared bins, token
shares per id bucket, per-layer expert-load shares, and a 2-D PCA of the embeddings. Plots are PNGs
inlined as base64 data URIs; every piece of text is passed through `html.escape`, since window
names and paths come from users.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from raymoe.monitor import plots

_Plot = Callable[[Any, Any], tuple[Figure, str]]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.verdict { font-size: 1.6em; font-weight: bold; padding: 0.3em 0.6em; display: inline-block; }
.verdict.drift { background: #fdd; color: #a00; }
.verdict.no-drift { background: #dfd; color: #060; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.meta dt { font-weight: bold; }
dl.meta dd { margin: 0; font-family: monospace; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
td.name { text-align: left; font-family: monospace; }
tr.drifted td.flag { background: #fdd; color: #a00; font-weight: bold; }
tr.ok td.flag { background: #dfd; color: #060; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; }
"""


def _e(value: Any) -> str:
    """Text for HTML: strings as they are, other values as JSON, always escaped."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return html.escape(text, quote=True)


def _number(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.4g}"


def _img(fig: Figure, caption: str, *, alt: str) -> str:
    data = base64.b64encode(plots.png_bytes(fig)).decode("ascii")
    return (
        f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _table(summary: Mapping[str, Any]) -> str:
    rows = []
    for feature, entry in summary["features"].items():
        for detector, r in entry["detectors"].items():
            is_test = r.get("p_value") is not None
            rule = f"p &lt; {r['threshold']:.4g}" if is_test else f"score &ge; {r['threshold']:.4g}"
            state = "drifted" if r["drifted"] else "ok"
            rows.append(
                f'<tr class="{state}"><td class="name">{_e(feature)}</td>'
                f'<td class="name">{_e(detector)}</td><td>{_number(r["score"])}</td>'
                f"<td>{rule}</td><td>{_number(r.get('p_value'))}</td>"
                f'<td class="flag">{"yes" if r["drifted"] else "no"}</td></tr>'
            )
    head = "<tr><th>feature</th><th>detector</th><th>score</th><th>alarm when</th><th>p-value</th><th>drifted</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _histogram(feature: str, xlabel: str, rows: str) -> _Plot:
    def plot(ref, cur):
        return (
            plots.histogram_figure(ref, cur, title=feature, xlabel=xlabel),
            f"{feature}: share of {rows} per bin, bins shared by both windows.",
        )

    return plot


def _shares(feature: str, xlabel: str, ylabel: str, what: str) -> _Plot:
    def plot(ref, cur):
        fig = plots.count_shares_figure(ref, cur, title=feature, xlabel=xlabel, ylabel=ylabel)
        return fig, f"{feature}: {what}, in at most 32 contiguous buckets."

    return plot


# One plot per feature of `drift.FEATURES` (a test checks that none is missing): (reference
# array, current array) -> (figure, caption).
PLOTS: dict[str, _Plot] = {
    "prompt_length": _histogram("prompt_length", "tokens per prompt", "prompts"),
    "output_length": _histogram("output_length", "tokens per response", "responses"),
    "mean_logprob": _histogram("mean_logprob", "mean token log-probability (nats)", "responses"),
    "token_histogram": _shares(
        "token_histogram",
        "first token id (or token bucket) of the bucket",
        "share of tokens",
        "share of all tokens per token id",
    ),
    "prompt_length_binned": _shares(
        "prompt_length_binned",
        "first length bin of the bucket",
        "share of prompts",
        "share of prompts per reference length bin",
    ),
    "expert_load": lambda ref, cur: (
        plots.expert_share_figure(ref, cur),
        "expert_load: each layer's tokens split over its experts (shares sum to 1 per layer); "
        "right: current minus reference.",
    ),
    "embedding": lambda ref, cur: (
        plots.embedding_pca_figure(np.asarray(ref), np.asarray(cur)),
        "embedding: both windows on the first two principal axes of the pooled, centred sample.",
    ),
}


def _window_plots(reference: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One figure per feature both windows hold, in `PLOTS` order."""
    return [
        _img(*PLOTS[feature](reference[feature], current[feature]), alt=feature)
        for feature in PLOTS
        if feature in reference and feature in current
    ]


def _meta_value(key: str, value: Any) -> str:
    """Unix seconds under "time" as UTC ISO; lists of strings comma-separated; others as JSON."""
    if key == "time" and isinstance(value, (int, float)):
        stamp = datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return _e(f"{stamp} ({value:.0f} unix s)")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return _e(", ".join(value))
    return _e(value)


def render_drift_html(
    summary: Mapping[str, Any],
    reference: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    title: str,
    meta: Mapping[str, Any],
) -> str:
    """The drift report as one self-contained HTML document.

    Args:
        summary: `raymoe.monitor.drift.summary(results)` of the two windows.
        reference: the reference window (feature name -> array), as given to `compare_windows`.
        current: the current window, same features and units.
        title: page title.
        meta: shown under the verdict, e.g. `drift_check.run_check`'s {"run", "time" (unix s,
            shown as UTC), "reference", "current_files", ...}; lists of strings are joined with
            commas, other non-strings shown as JSON.

    Returns:
        The HTML text (UTF-8 when written). Features absent from either window get no plot; the
        table lists every result in `summary`.
    """
    drifted = bool(summary["drifted"])
    verdict = '<p class="verdict drift">DRIFT</p>' if drifted else '<p class="verdict no-drift">NO DRIFT</p>'
    if drifted:
        verdict += f"<p>Drifted features: {_e(', '.join(summary['drifted_features']))}</p>"
    meta_items = "".join(f"<dt>{_e(str(k))}</dt><dd>{_meta_value(k, v)}</dd>" for k, v in meta.items())
    figures = _window_plots(reference, current)
    body = [
        f"<h1>{_e(title)}</h1>",
        verdict,
        f'<dl class="meta">{meta_items}</dl>',
        "<h2>Detectors</h2>",
        _table(summary),
        "<h2>Reference vs current</h2>",
        *(figures or ["<p>No feature is in both windows.</p>"]),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
