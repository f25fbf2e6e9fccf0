"""The drift HTML report: parses and nests, references nothing outside itself, inlines valid PNGs,
has one table row per (feature, detector) with the right drifted state, escapes every text, and
plots only features both windows hold."""

import base64
import io
import math
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from raymoe.monitor.drift import FEATURES, DriftConfig, compare_windows, summary
from raymoe.monitor.drift_html import PLOTS, render_drift_html

VOID = {"meta", "img", "br", "hr", "link", "input"}


class Page(HTMLParser):
    """Collects what the tests look at and checks that every non-void tag is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []
        self.tags, self.rows, self.imgs, self.dd = [], [], [], []
        self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "img":
            self.imgs.append(attrs)
        if tag == "tr" and attrs.get("class"):
            self._row = {"class": attrs["class"], "cells": []}
        if tag in ("td", "dd"):
            self._cell = []

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}>")
        if tag == "td" and self._row is not None:
            self._row["cells"].append("".join(self._cell))
        if tag == "dd":
            self.dd.append("".join(self._cell))
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    assert page.errors == [] and page.stack == [], (page.errors, page.stack)
    return page


def _window(rng, n, *, prompt_scale=1.0, hot_share=0.0):
    """Synthetic traffic (as in test_monitor_drift); the keywords inject a prompt-length shift
    and a hot expert in layer 0."""
    routing_LE = rng.dirichlet(np.full(8, 50.0), 3)
    routing_LE[0] *= 1 - hot_share
    routing_LE[0, 0] += hot_share
    return {
        "prompt_length": np.maximum(1, np.rint(rng.lognormal(math.log(200 * prompt_scale), 0.8, n))).astype(int),
        "output_length": np.maximum(1, np.rint(rng.lognormal(math.log(150), 0.7, n))).astype(int),
        "mean_logprob": rng.normal(-1.2, 0.3, n),
        "token_histogram": rng.multinomial(50_000, np.full(300, 1 / 300)),
        "prompt_length_binned": rng.multinomial(n, np.full(12, 1 / 12)),
        "expert_load": np.stack([rng.multinomial(20_000, p) for p in routing_LE]),
        "embedding": rng.normal(0.0, 1.0, (60, 8)),
    }


@pytest.fixture(scope="module")
def drifted():
    """Windows with a 1.5x prompt-length shift and a hot expert; other features unchanged."""
    rng = np.random.default_rng(7)
    reference = _window(rng, 1500)
    current = _window(rng, 1200, prompt_scale=1.5, hot_share=0.3)
    digest = summary(compare_windows(reference, current, DriftConfig()))
    meta = {
        "current window": "traffic/<script>alert('x')</script>.jsonl",
        "reference": "ingestion profile",
        "time (UTC)": "2026-11-30T19:00:00Z",
    }
    html = render_drift_html(digest, reference, current, title="Drift <b>weekly</b> & more", meta=meta)
    return digest, meta, html


def test_the_page_nests_and_references_nothing_outside_itself(drifted):
    _, _, html = drifted
    page = _parse(html)
    lowered = html.lower()
    for needle in ('src="http', 'href="http', "<script", "<link", "url(", "@import"):
        assert needle not in lowered
    assert all(not str(attrs.get("src", "")).startswith(("http", "//")) for _, attrs in page.tags)


def test_every_image_is_an_inline_png_that_decodes(drifted):
    _, _, html = drifted
    page = _parse(html)
    assert [img["alt"] for img in page.imgs] == list(FEATURES)  # every feature, in order
    for img in page.imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        data = base64.b64decode(img["src"][len(prefix) :], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # every chunk's CRC, through IEND: a truncated file fails here
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.size[0] > 100 and image.size[1] > 100


def test_table_has_one_row_per_result_with_its_drifted_state(drifted):
    digest, _, html = drifted
    expected = [
        (feature, detector, "drifted" if r["drifted"] else "ok")
        for feature, entry in digest["features"].items()
        for detector, r in entry["detectors"].items()
    ]
    states = {state for *_, state in expected}
    assert states == {"drifted", "ok"}  # the fixture exercises both colours
    assert ("prompt_length", "ks", "drifted") in expected and ("embedding", "mmd", "ok") in expected

    rows = _parse(html).rows

    assert [(r["cells"][0], r["cells"][1], r["class"]) for r in rows] == expected
    assert [r["cells"][5] for r in rows] == ["yes" if s == "drifted" else "no" for *_, s in expected]
    ks = next(r for r in rows if r["cells"][:2] == ["prompt_length", "ks"])
    assert float(ks["cells"][4]) == pytest.approx(
        digest["features"]["prompt_length"]["detectors"]["ks"]["p_value"], rel=1e-3
    )


def test_title_and_meta_are_escaped_and_shown_verbatim(drifted):
    _, meta, html = drifted
    assert "<script" not in html and "<b>weekly" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<title>Drift &lt;b&gt;weekly&lt;/b&gt; &amp; more</title>" in html
    assert _parse(html).dd == list(meta.values())  # the parser unescapes back to the input


def test_every_drift_feature_has_a_plot():
    # A feature added to raymoe.monitor.drift must get a plot here too.
    assert list(PLOTS) == list(FEATURES)


def test_meta_time_is_shown_as_utc_and_file_lists_joined():
    window = {"prompt_length": np.arange(1, 40)}
    digest = summary(compare_windows(window, window, DriftConfig()))

    page = _parse(
        render_drift_html(
            digest, window, window, title="t", meta={"time": 86400.0, "current_files": ["a.npz", "b.npz"]}
        )
    )

    assert page.dd == ["1970-01-02T00:00:00Z (86400 unix s)", "a.npz, b.npz"]


def test_verdict_follows_the_summary():
    rng = np.random.default_rng(0)
    window = {"prompt_length": rng.integers(1, 50, 300)}
    same = summary(compare_windows(window, window, DriftConfig()))
    assert not same["drifted"]

    html = render_drift_html(same, window, window, title="t", meta={})

    assert '<p class="verdict no-drift">NO DRIFT</p>' in html and ">DRIFT<" not in html


def test_drifted_verdict_names_the_features(drifted):
    digest, _, html = drifted
    assert '<p class="verdict drift">DRIFT</p>' in html
    assert f"Drifted features: {', '.join(digest['drifted_features'])}" in html


def test_features_missing_from_either_window_get_no_plot():
    rng = np.random.default_rng(1)
    reference = {"prompt_length": rng.integers(1, 50, 200), "embedding": rng.normal(size=(20, 4))}
    current = {"prompt_length": rng.integers(1, 60, 200), "mean_logprob": rng.normal(size=200)}
    digest = summary(compare_windows(reference, current, DriftConfig()))

    page = _parse(render_drift_html(digest, reference, current, title="t", meta={}))

    assert [img["alt"] for img in page.imgs] == ["prompt_length"]
    assert {r["cells"][0] for r in page.rows} == {"prompt_length"}
