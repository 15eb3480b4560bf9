"""Prometheus metrics with vLLM's names under the ``blora:`` prefix.

Engine state (running/waiting requests, KV usage, token counters, running/waiting adapters) is read from
``engine.stats()`` at scrape time; latencies (TTFT, inter-token, per-output-token, end-to-end) are observed
by the server as it streams, so they include queueing, tokenization and detokenization. Every app has its
own registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def _tally(adapters: Any) -> Tally[str]:
    """Adapter occupancy from stats(): a {name: count} mapping or an iterable of names."""
    if not adapters:
        return Tally()
    if isinstance(adapters, dict):
        return Tally({str(k): int(v) for k, v in adapters.items()})
    return Tally(str(a) for a in adapters)


class EngineCollector:
    """Reads ``engine.stats()`` on every scrape."""

    def __init__(self, engine: Any, model_name: str, max_loras: int | None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_loras = max_loras

    def describe(self) -> list[Metric]:
        return []  # collected lazily; the engine may not be ready when the collector is registered

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        labels, values = ["model_name"], [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("blora:num_requests_running", "Requests in the running batch.", s.get("num_running", 0))
        yield gauge(
            "blora:num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0)
        )
        yield gauge(
            "blora:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", s.get("kv_usage", 0)
        )
        yield counter("blora:prompt_tokens", "Prompt tokens processed.", s.get("prompt_tokens_total", 0))
        yield counter("blora:generation_tokens", "Tokens generated.", s.get("generation_tokens_total", 0))
        yield from self._adapters(s)

    def _adapters(self, s: dict[str, Any]) -> Iterable[Metric]:
        running, waiting = _tally(s.get("running_adapters")), _tally(s.get("waiting_adapters"))
        info = GaugeMetricFamily(
            "blora:lora_requests_info",
            "Running and waiting adapters (comma-separated labels); value is the scrape time.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        max_lora = "" if self.max_loras is None else str(self.max_loras)
        info.add_metric([max_lora, ",".join(sorted(running)), ",".join(sorted(waiting))], time.time())
        yield info
        for name, tally, doc in (
            ("blora:adapter_requests_running", running, "Running requests per adapter."),
            ("blora:adapter_requests_waiting", waiting, "Waiting requests per adapter."),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name", "adapter"])
            for adapter, count in sorted(tally.items()):
                g.add_metric([self.model_name, adapter], count)
            yield g


class ServerMetrics:
    """All metrics of one app; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, engine: Any, model_name: str, max_loras: int | None) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, lbl = self.registry, ["model_name"]
        self.ttft = Histogram("blora:time_to_first_token_seconds", "Time to first token (server arrival to first token).", lbl, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("blora:inter_token_latency_seconds", "Time between consecutive token deliveries.", lbl, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("blora:request_time_per_output_token_seconds", "(e2e - ttft) / (output tokens - 1) per request.", lbl, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("blora:e2e_request_latency_seconds", "End-to-end request latency.", lbl, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.prompt_len = Histogram("blora:request_prompt_tokens", "Prompt tokens per request.", lbl, buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.output_len = Histogram("blora:request_generation_tokens", "Generated tokens per request.", lbl, buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.success = Counter("blora:request_success", "Finished requests by finish reason.", ["model_name", "finished_reason"], registry=r)  # fmt: skip
        self.rejected = Counter("blora:request_rejected", "Requests refused before reaching the engine.", ["model_name", "reason"], registry=r)  # fmt: skip
        self.in_flight = Gauge("blora:server_requests_in_flight", "Generation requests admitted by the HTTP server and not finished.", lbl, registry=r)  # fmt: skip
        self.draining = Gauge("blora:server_draining", "1 while the server drains for shutdown.", lbl, registry=r)  # fmt: skip
        self.adapter_loads = Counter("blora:adapter_loads", "Runtime adapter load attempts by outcome.", ["model_name", "outcome"], registry=r)  # fmt: skip
        self.registry.register(EngineCollector(engine, model_name, max_loras))

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one engine request (one prompt; all of its ``n`` choices)."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.m = metrics
        self.arrival = arrival
        self.first: float | None = None
        self.last: float | None = None

    def on_tokens(self) -> None:
        now = time.monotonic()
        name = self.m.model_name
        if self.first is None:
            self.first = now
            self.m.ttft.labels(name).observe(now - self.arrival)
        elif self.last is not None:
            self.m.itl.labels(name).observe(now - self.last)
        self.last = now

    def on_finish(self, prompt_tokens: int, outputs: list[tuple[int, str | None]]) -> None:
        """``outputs``: (generated tokens, finish reason) of each choice."""
        now, name = time.monotonic(), self.m.model_name
        self.m.e2e.labels(name).observe(now - self.arrival)
        self.m.prompt_len.labels(name).observe(prompt_tokens)
        longest = max((n for n, _ in outputs), default=0)
        if self.first is not None and longest > 1:
            self.m.tpot.labels(name).observe((now - self.first) / (longest - 1))
        for num_tokens, reason in outputs:
            self.m.output_len.labels(name).observe(num_tokens)
            self.m.success.labels(name, reason or "unknown").inc()
