"""The server's Prometheus metrics (`GET /metrics`): how fast it answers, how busy it is.

Per generation (one engine request; a call with n choices makes n):

- time to first token, TTFT = t(first token) − t(submit): what a user waits before text
  appears, queueing plus the prompt's prefill;
- time per output token, TPOT = (t(last token) − t(first token)) / (tokens − 1): the
  decode speed that one user sees; it falls as the running batch grows, while the tokens
  per second of the whole server rise;
- finished generations by finish reason (stop, length, cancelled, error) and prompt tokens.

At each scrape, from `Engine.stats()`: the queue depth, the running batch size, the batch
limit, the tokens generated. And HTTP responses by endpoint and status code.

Each app has its own `CollectorRegistry`, not prometheus_client's global one, so two apps
in one process (tests) count apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector(Collector):
    """The engine's own counts, read when scraped (nothing while the model loads)."""

    def __init__(self, stats: Callable[[], dict | None]):
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self.stats()
        if s is None:
            return
        yield GaugeMetricFamily("lmlab_queue_depth", "requests waiting for a slot",
                                value=s["queue_depth"])
        yield GaugeMetricFamily("lmlab_running_requests", "rows of the running batch",
                                value=s["running"])
        yield GaugeMetricFamily("lmlab_max_batch", "the running batch's limit",
                                value=s["max_batch"])
        yield CounterMetricFamily("lmlab_generation_tokens", "tokens generated",
                                  value=s["tokens_generated"])


class ServerMetrics:
    """The registry of one app and the measurements the server takes."""

    def __init__(self, engine_stats: Callable[[], dict | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("lmlab_time_to_first_token_seconds",
                              "submit to first generated token", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("lmlab_time_per_output_token_seconds",
                              "mean time between a generation's tokens after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.finished = Counter("lmlab_generations_finished", "generations by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("lmlab_prompt_tokens", "prompt tokens submitted", registry=r)
        self.http = Counter("lmlab_http_requests", "HTTP responses by endpoint and status code",
                            ["endpoint", "status"], registry=r)
        r.register(_EngineCollector(engine_stats))

    def track(self, on_event: Callable) -> Callable:
        """`on_event` wrapped to time one generation (it runs in the engine's thread)."""
        t_submit = time.perf_counter()
        first = last = None
        tokens = 0

        def tracked(ev) -> None:
            nonlocal first, last, tokens
            if ev.token_ids:
                last = time.perf_counter()
                tokens += len(ev.token_ids)
                if first is None:
                    first = last
                    self.ttft.observe(first - t_submit)
            if ev.finish_reason is not None:
                if tokens > 1:
                    self.tpot.observe((last - first) / (tokens - 1))
                self.finished.labels(ev.finish_reason).inc()
            on_event(ev)

        return tracked

    def render(self) -> tuple[bytes, str]:
        """(the text exposition format, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountResponses:
    """ASGI middleware: count each HTTP response by endpoint (`endpoint(path)`) and status."""

    def __init__(self, app, metrics: ServerMetrics, endpoint: Callable[[str], str]):
        self.app, self.metrics, self.endpoint = app, metrics, endpoint

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]  # what the client gets if the app fails before it answers

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.http.labels(self.endpoint(scope["path"]), str(status[0])).inc()
