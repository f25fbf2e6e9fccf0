"""Serve metrics: names from raymoe.monitor.metrics, tags, counter deltas, bounded route labels."""

import torch

from raymoe.monitor import metrics as m
from raymoe.serve import serve_metrics
from raymoe.serve.serve_metrics import ServeMetrics


class Recorder:
    def __init__(self, name):
        self.name, self.calls = name, []

    def inc(self, value, tags):
        self.calls.append(("inc", value, tags))

    def set(self, value, tags):
        self.calls.append(("set", value, tags))

    def observe(self, value, tags):
        self.calls.append(("observe", value, tags))


class FakeEngine:
    def __init__(self):
        self.counts = torch.tensor([[3, 0], [1, 2]])
        self.generated = 10

    def expert_counts(self):
        return self.counts.clone()

    def stats(self):
        return {
            "running": 2,
            "waiting": 1,
            "kv_usage": 0.25,
            "batch_size": 3,
            "generated_tokens": self.generated,
            "preemptions": 0,
        }


def test_metrics_record_requests_gauges_and_counter_deltas(monkeypatch):
    recorders = {}
    monkeypatch.setattr(
        serve_metrics.m, "ray_metric", lambda spec: recorders.setdefault(spec.name, Recorder(spec.name))
    )
    metrics = ServeMetrics(model="moe", enabled=True)
    metrics.count_request("/v1/chat/completions", 200)
    metrics.count_request("/v1/../../etc", 404)
    metrics.observe_request("/v1/chat/completions", 200, 0.05, 0.01, 0.2, 16)
    engine = FakeEngine()
    metrics.sample_engine(engine)
    engine.generated = 25
    engine.counts = torch.tensor([[4, 0], [1, 5]])
    metrics.sample_engine(engine)

    requests = recorders[m.SERVE_REQUESTS.name].calls
    assert [c[2]["route"] for c in requests] == ["/v1/chat/completions", "other"]
    assert requests[1][2]["status"] == "404"
    assert recorders[m.SERVE_TTFT_SECONDS.name].calls == [
        ("observe", 0.05, {"model": "moe", "route": "/v1/chat/completions"})
    ]
    assert recorders[m.SERVE_RUNNING_SEQS.name].calls[-1] == ("set", 2, {"model": "moe"})
    assert recorders[m.SERVE_KV_CACHE_USAGE.name].calls[-1] == ("set", 0.25, {"model": "moe"})
    # counters get deltas: 10 then 25 - 10
    assert [c[1] for c in recorders[m.SERVE_GENERATED_TOKENS.name].calls] == [10, 15]
    experts = [(c[2]["layer"], c[2]["expert"], c[1]) for c in recorders[m.SERVE_TOKENS_PER_EXPERT.name].calls]
    assert experts == [("0", "0", 3), ("1", "0", 1), ("1", "1", 2), ("0", "0", 1), ("1", "1", 3)]


def test_every_serve_metric_is_registered_once():
    names = [s.name for s in m.REGISTRY]
    assert all(s in m.REGISTRY for s in m.SERVE_METRICS)
    assert len(names) == len(set(names))
