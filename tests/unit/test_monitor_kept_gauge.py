"""Gauges are set again with their last values, so Ray's metrics agent keeps exporting a process
that reports rarely (it drops a process's series after RAY_WORKER_TIMEOUT_S without a report)."""

from raymoe.monitor.metrics import KeptGauge


class RecordingGauge:
    def __init__(self):
        self.calls = []

    def set(self, value, tags=None):
        self.calls.append((value, tags))


def test_refresh_sets_the_last_value_of_every_tag_set_again():
    # Prepare
    inner = RecordingGauge()
    gauge = KeptGauge(inner)
    gauge.set(1.0, {"run": "a", "feature": "x"})
    gauge.set(2.0, tags={"feature": "x", "run": "a"})  # same tag set, other key order
    gauge.set(5.0, {"run": "b"})
    inner.calls.clear()
    # Execute
    gauge.refresh()
    # Assert: one call per tag set, with its newest value
    assert sorted(inner.calls, key=lambda c: c[0]) == [(2.0, {"feature": "x", "run": "a"}), (5.0, {"run": "b"})]


def test_refresh_before_any_set_reports_nothing():
    inner = RecordingGauge()
    KeptGauge(inner).refresh()
    assert inner.calls == []
