"""/metrics in Prometheus' text format (prometheus-client): requests by status, token counts, the engine's
queue and KV blocks, time to first token and inter-token latency. Each app has its own registry, so several
servers can live in one process (the tests)."""

import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineCollector:
    """Reads the engine's counters at each scrape, so they are never out of step with the engine."""

    def __init__(self, engine: Callable):
        self.engine = engine  # () -> Engine | None (None while loading)

    def collect(self):
        engine = self.engine()
        if engine is None:
            return
        s = engine.stats()
        gauges = {"running_requests": ("requests being decoded", s.running),
                  "waiting_requests": ("requests queued for a slot", s.waiting),
                  "kv_blocks_used": ("KV cache blocks in use", s.kv_blocks_used),
                  "kv_blocks_total": ("KV cache blocks in the pool", s.kv_blocks_total)}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"modelcode_{name}", doc, value=value)
        counters = {"prompt_tokens": ("prompt tokens received", s.prompt_tokens),
                    "generation_tokens": ("tokens generated", s.generated_tokens),
                    "prefix_cache_hit_tokens": ("prompt tokens reused from the prefix cache", s.prefix_hit_tokens),
                    "preemptions": ("requests preempted for lack of KV blocks", s.preemptions)}
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"modelcode_{name}", doc, value=value)


class Metrics:
    def __init__(self, engine: Callable):
        self.registry = CollectorRegistry()
        self.requests = Counter("modelcode_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("modelcode_time_to_first_token_seconds", "from a request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("modelcode_inter_token_latency_seconds", "between a request's successive outputs",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(engine))

    def text(self) -> bytes:
        return generate_latest(self.registry)

    async def timed(self, outputs: AsyncIterator, start: float) -> AsyncIterator:
        """Pass a request's outputs through, observing its time to first token and inter-token latency."""
        last = None
        async for out in outputs:
            now = time.perf_counter()
            if out.token_ids:
                (self.ttft if last is None else self.itl).observe(now - (start if last is None else last))
                last = now
            yield out
