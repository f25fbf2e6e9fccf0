"""Records the serve metrics (names in `raymoe.monitor.metrics`) from a Serve replica.

Request metrics are observed per request by the HTTP layer; engine gauges (running / waiting
sequences, KV usage, batch size) and counters (generated tokens, preemptions, tokens per expert)
are sampled by a background task every `interval_s`, so the engine step never waits on metrics;
so are the copies of each expert in the replica's placement (set again at once when a live
re-placement changes it, `set_expert_copies`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from raymoe.monitor import metrics as m

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health")


@dataclass
class ServeMetrics:
    model: str
    enabled: bool = True
    interval_s: float = 2.0
    # Physical copies of each logical expert in the replica's placement (`expert_copies`).
    expert_copies: list[int] = field(default_factory=list)
    _last: dict = field(default_factory=dict)
    _task: asyncio.Task | None = None

    @classmethod
    def create(cls, model: str) -> ServeMetrics:
        """Metrics on when Ray is up (inside a replica); a no-op recorder otherwise."""
        try:
            import ray

            enabled = ray.is_initialized()
        except ImportError:
            enabled = False
        return cls(model=model, enabled=enabled)

    def observe_request(self, route, status, ttft_s, tpot_s, e2e_s, completion_tokens) -> None:
        if not self.enabled:
            return
        if self._task is None and getattr(self, "_engine", None) is not None:
            # The replica's event loop exists only once requests flow: start sampling here.
            self._task = asyncio.get_running_loop().create_task(self.run(self._engine))
        tags = {"model": self.model, "route": route}
        if ttft_s is not None:
            m.ray_metric(m.SERVE_TTFT_SECONDS).observe(ttft_s, tags)
        if tpot_s is not None:
            m.ray_metric(m.SERVE_TPOT_SECONDS).observe(tpot_s, tags)
        m.ray_metric(m.SERVE_E2E_SECONDS).observe(e2e_s, tags)

    def count_request(self, path: str, status: int) -> None:
        """Counts every answered request (errors included) by path and status code."""
        if self.enabled:
            route = path if path in ROUTES else "other"  # a client must not grow the label set
            m.ray_metric(m.SERVE_REQUESTS).inc(1, {"model": self.model, "route": route, "status": str(status)})

    def start_engine_gauges(self, engine) -> None:
        """Samples `engine.stats()` every `interval_s` once the first request has been observed."""
        self._engine = engine

    def set_expert_copies(self, copies: list[int]) -> None:
        """The replica switched placement (live re-placement): the gauge follows at once."""
        self.expert_copies = list(copies)
        if self.enabled:
            gauge = m.ray_metric(m.SERVE_EXPERT_COPIES)
            for expert, n in enumerate(self.expert_copies):
                gauge.set(n, {"model": self.model, "expert": str(expert)})

    def set_engine_dtype(self, dtype: str) -> None:
        """raymoe_serve_engine_info{dtype} = 1 (the gauge keeper re-reports it while the replica lives)."""
        if self.enabled:
            m.ray_metric(m.SERVE_ENGINE_INFO).set(1, {"model": self.model, "dtype": dtype})

    def sample_engine(self, engine) -> None:
        """One sample of the engine's gauges and counter deltas."""
        if not self.enabled:
            return
        tags = {"model": self.model}
        stats = engine.stats()
        m.ray_metric(m.SERVE_RUNNING_SEQS).set(stats.get("running", 0), tags)
        m.ray_metric(m.SERVE_WAITING_SEQS).set(stats.get("waiting", 0), tags)
        m.ray_metric(m.SERVE_KV_CACHE_USAGE).set(stats.get("kv_usage", 0.0), tags)
        m.ray_metric(m.SERVE_BATCH_SIZE).set(stats.get("batch_size", 0), tags)
        for key, spec in (("generated_tokens", m.SERVE_GENERATED_TOKENS), ("preemptions", m.SERVE_PREEMPTIONS)):
            delta = stats.get(key, 0) - self._last.get(key, 0)
            if delta > 0:
                m.ray_metric(spec).inc(delta, tags)
            self._last[key] = stats.get(key, 0)
        counts = engine.expert_counts()
        prev = self._last.get("experts")
        delta = counts - prev if prev is not None else counts
        self._last["experts"] = counts
        counter = m.ray_metric(m.SERVE_TOKENS_PER_EXPERT)
        for layer, row in enumerate(delta.tolist()):
            for expert, n in enumerate(row):
                if n > 0:
                    counter.inc(n, {**tags, "layer": str(layer), "expert": str(expert)})

    async def run(self, engine) -> None:
        # The placement changes only through `set_expert_copies`; the gauge keeper re-reports it.
        self.set_expert_copies(self.expert_copies)
        while True:
            self.sample_engine(engine)
            await asyncio.sleep(self.interval_s)
