"""Prometheus metrics under vLLM's names: ``vllm:`` (as vLLM exports them) and ``blora:`` (the same names).

``names`` chooses the prefixes: ``"both"`` (default), ``"vllm"`` or ``"blora"``. The ``vllm:`` families
carry vLLM's labels (``model_name``, ``engine``) and buckets, so dashboards and gateways written for vLLM
(``vllm:num_requests_running``, ``vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters,
max_lora}``, ...) read blora unchanged; the ``blora:`` families keep ``model_name`` only. Server-only
metrics (rejections, in-flight, draining, runtime adapter loads, per-adapter occupancy) are ``blora:`` only.

Engine state (running/waiting requests, KV usage, token and preemption counters, running/waiting adapters)
is read from ``engine.stats()`` at scrape time. Latencies (TTFT, inter-token, per-output-token,
end-to-end) are observed by the server as it streams, so they include tokenization and detokenization;
queue, prefill, decode and inference times come from the engine's timestamps of each request
(``RequestOutput.metrics``: arrival, first scheduled step, first token, finish). Every app has its own
registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from blora.engine.client import EngineClient

METRIC_NAMES = ("both", "vllm", "blora")
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# vLLM's buckets (vllm/v1/metrics/loggers.py), so histogram quantiles compare bucket for bucket.
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
VLLM_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0)  # fmt: skip
VLLM_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                        120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
VLLM_N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's ``build_1_2_5_buckets``)."""
    out: list[int] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(value)
        exponent += 1


def _tally(adapters: Any) -> Tally[str]:
    """Adapter occupancy from stats(): a {name: count} mapping or an iterable of names."""
    if not adapters:
        return Tally()
    if isinstance(adapters, dict):
        return Tally({str(k): int(v) for k, v in adapters.items()})
    return Tally(str(a) for a in adapters)


class _Fanout:
    """One metric under several prefixes: ``labels(...)`` returns a child that updates each of them
    (the ``vllm:`` ones with the extra ``engine`` label)."""

    def __init__(self, metrics: list[tuple[Any, tuple[str, ...]]]) -> None:
        self.metrics = metrics
        self._children: dict[tuple[str, ...], _Fanout] = {}

    def labels(self, *values: str) -> _Fanout:
        """The child for these label values, built once: the server observes the inter-token latency for
        every streamed token, and prometheus-client's ``labels`` takes a lock and builds its key each call
        (measured: ~6 us of ~41 us of event-loop CPU per streamed chunk)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Fanout(
                [(m.labels(*values, *extra), ()) for m, extra in self.metrics]
            )
        return child

    def observe(self, value: float) -> None:
        for m, _ in self.metrics:
            m.observe(value)

    def inc(self, amount: float = 1.0) -> None:
        for m, _ in self.metrics:
            m.inc(amount)

    def set(self, value: float) -> None:
        for m, _ in self.metrics:
            m.set(value)

    def set_function(self, fn: Any) -> None:
        for m, _ in self.metrics:
            m.set_function(fn)


class EngineCollector:
    """Reads ``engine.stats()`` on every scrape."""

    def __init__(
        self, engine: EngineClient, model_name: str, max_loras: int | None, prefixes: tuple[str, ...]
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_loras = max_loras
        self.prefixes = prefixes

    def describe(self) -> list[Metric]:
        return []  # collected lazily; the engine may not be ready when the collector is registered

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        for prefix in self.prefixes:
            yield from self._engine_state(prefix, s)
        running, waiting = _tally(s.get("running_adapters")), _tally(s.get("waiting_adapters"))
        for prefix in self.prefixes:
            yield self._lora_info(prefix, running, waiting)
        if "blora" in self.prefixes:
            yield from self._per_adapter(running, waiting)

    def _engine_state(self, prefix: str, s: dict[str, Any]) -> Iterator[Metric]:
        vllm = prefix == "vllm"
        labels = ["model_name", "engine"] if vllm else ["model_name"]
        values = [self.model_name, "0"] if vllm else [self.model_name]

        def family(kind: type, name: str, doc: str, value: float) -> Metric:
            f = kind(f"{prefix}:{name}", doc, labels=labels)
            f.add_metric(values, value)
            return f

        kv = s.get("kv_usage", 0)
        yield family(GaugeMetricFamily, "num_requests_running", "Requests in the running batch.", s.get("num_running", 0))  # fmt: skip
        yield family(GaugeMetricFamily, "num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0))  # fmt: skip
        yield family(
            GaugeMetricFamily, "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv
        )
        if vllm:  # the older name, still read by many dashboards
            yield family(GaugeMetricFamily, "gpu_cache_usage_perc", "KV-cache usage (older name of kv_cache_usage_perc).", kv)  # fmt: skip
        yield family(CounterMetricFamily, "prompt_tokens", "Number of prefill tokens processed.", s.get("prompt_tokens_total", 0))  # fmt: skip
        yield family(CounterMetricFamily, "generation_tokens", "Number of generation tokens processed.", s.get("generation_tokens_total", 0))  # fmt: skip
        yield family(CounterMetricFamily, "num_preemptions", "Cumulative number of preemptions from the engine.", s.get("num_preemptions_total", 0))  # fmt: skip
        if "prefix_cache_queries_total" in s:  # engines with a prefix cache
            yield family(CounterMetricFamily, "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", s["prefix_cache_queries_total"])  # fmt: skip
            yield family(CounterMetricFamily, "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", s.get("prefix_cache_hits_total", 0))  # fmt: skip
        yield family(CounterMetricFamily, "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", s.get("prefix_cache_queries_total", 0))  # fmt: skip
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", s.get("prefix_cache_hits_total", 0))  # fmt: skip

    def _lora_info(self, prefix: str, running: Tally[str], waiting: Tally[str]) -> Metric:
        info = GaugeMetricFamily(
            f"{prefix}:lora_requests_info",
            "Running stats on lora requests (adapters comma-separated in the labels); value: scrape time.",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        max_lora = "" if self.max_loras is None else str(self.max_loras)
        info.add_metric([max_lora, ",".join(sorted(waiting)), ",".join(sorted(running))], time.time())
        return info

    def _per_adapter(self, running: Tally[str], waiting: Tally[str]) -> Iterable[Metric]:
        for name, tally, doc in (
            ("blora:adapter_requests_running", running, "Running requests per adapter."),
            ("blora:adapter_requests_waiting", waiting, "Waiting requests per adapter."),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name", "adapter"])
            for adapter, count in sorted(tally.items()):
                g.add_metric([self.model_name, adapter], count)
            yield g


class ServerMetrics:
    """All metrics of one app; ``render()`` is the body of ``GET /metrics``.

    ``names``: ``"both"`` (``vllm:`` and ``blora:``), ``"vllm"`` or ``"blora"``; ``max_model_len`` sizes
    the token-count buckets as vLLM does (1, 2, 5, 10, ... up to it).
    """

    def __init__(
        self,
        engine: EngineClient,
        model_name: str,
        max_loras: int | None,
        names: str = "both",
        max_model_len: int | None = None,
    ) -> None:
        if names not in METRIC_NAMES:
            raise ValueError(f"metric names must be one of {METRIC_NAMES}, got {names!r}")
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.prefixes = ("vllm", "blora") if names == "both" else (names,)
        tokens = buckets_1_2_5(max_model_len) if max_model_len else TOKEN_BUCKETS
        lat, req, tpot = LATENCY_BUCKETS, VLLM_REQUEST_BUCKETS, VLLM_TPOT_BUCKETS
        h = self._histogram
        self.ttft = h("time_to_first_token_seconds", "Time to first token (server arrival to first token).", lat, VLLM_TTFT_BUCKETS)  # fmt: skip
        self.itl = h("inter_token_latency_seconds", "Time between consecutive output tokens as delivered (with --stream-interval N: each delivery's gap over its tokens).", lat, tpot, also="time_per_output_token_seconds")  # fmt: skip
        self.tpot = h("request_time_per_output_token_seconds", "(e2e - ttft) / (output tokens - 1) per request.", lat, tpot)  # fmt: skip
        self.e2e = h("e2e_request_latency_seconds", "End-to-end request latency.", lat, req)
        self.queue = h("request_queue_time_seconds", "Time from arrival at the engine to its first step.", lat, req)  # fmt: skip
        self.prefill = h("request_prefill_time_seconds", "Time from the first step to the first token.", lat, req)  # fmt: skip
        self.decode = h("request_decode_time_seconds", "Time from the first token to the last.", lat, req)
        self.inference = h("request_inference_time_seconds", "Time from the first step to the last token.", lat, req)  # fmt: skip
        self.prompt_len = h("request_prompt_tokens", "Prompt tokens per request.", tokens, tokens)
        self.output_len = h("request_generation_tokens", "Generated tokens per request.", tokens, tokens)
        self.max_tokens = h("request_params_max_tokens", "The max_tokens request parameter.", tokens, tokens)
        self.n = h("request_params_n", "The n request parameter.", VLLM_N_BUCKETS, VLLM_N_BUCKETS)
        self.success = self._counter("request_success", "Finished requests by finish reason.", ["finished_reason"])  # fmt: skip
        r, lbl = self.registry, ["model_name"]
        self.rejected = Counter("blora:request_rejected", "Requests refused before reaching the engine.", ["model_name", "reason"], registry=r)  # fmt: skip
        self.in_flight = Gauge("blora:server_requests_in_flight", "Generation requests admitted by the HTTP server and not finished.", lbl, registry=r)  # fmt: skip
        self.draining = Gauge("blora:server_draining", "1 while the server drains for shutdown.", lbl, registry=r)  # fmt: skip
        self.adapter_loads = Counter("blora:adapter_loads", "Runtime adapter load attempts by outcome.", ["model_name", "outcome"], registry=r)  # fmt: skip
        self.registry.register(EngineCollector(engine, model_name, max_loras, self.prefixes))

    def _histogram(self, name: str, doc: str, buckets: Any, vllm_buckets: Any, also: str = "") -> _Fanout:
        metrics: list[tuple[Any, tuple[str, ...]]] = []
        if "blora" in self.prefixes:
            metrics.append((Histogram(f"blora:{name}", doc, ["model_name"], buckets=buckets, registry=self.registry), ()))  # fmt: skip
        if "vllm" in self.prefixes:
            for vname in (name, also) if also else (name,):
                vh = Histogram(f"vllm:{vname}", doc, ["model_name", "engine"], buckets=vllm_buckets, registry=self.registry)  # fmt: skip
                metrics.append((vh, ("0",)))
        return _Fanout(metrics)

    def _counter(self, name: str, doc: str, extra: list[str]) -> _Fanout:
        metrics: list[tuple[Any, tuple[str, ...]]] = []
        if "blora" in self.prefixes:
            metrics.append((Counter(f"blora:{name}", doc, ["model_name", *extra], registry=self.registry), ()))  # fmt: skip
        if "vllm" in self.prefixes:
            # the engine label last here (label order means nothing to Prometheus)
            c = Counter(f"vllm:{name}", doc, ["model_name", *extra, "engine"], registry=self.registry)
            metrics.append((c, ("0",)))
        return _Fanout(metrics)

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

    def on_tokens(self, new: int = 1) -> None:
        """``new`` tokens delivered now (more than one with ``--stream-interval``: their mean gap is
        observed, once per delivery)."""
        now = time.monotonic()
        name = self.m.model_name
        if self.first is None:
            self.first = now
            self.m.ttft.labels(name).observe(now - self.arrival)
        elif self.last is not None:
            self.m.itl.labels(name).observe((now - self.last) / new)
        self.last = now

    def on_params(self, n: int, max_tokens: int) -> None:
        name = self.m.model_name
        self.m.n.labels(name).observe(n)
        self.m.max_tokens.labels(name).observe(max_tokens)

    def on_finish(
        self, prompt_tokens: int, outputs: list[tuple[int, str | None]], engine_times: Any = None
    ) -> None:
        """``outputs``: (generated tokens, finish reason) of each choice; ``engine_times``: the final
        ``RequestOutput.metrics`` (arrival, first scheduled step, first token, finish: ``time.time()``)."""
        now, name = time.monotonic(), self.m.model_name
        self.m.e2e.labels(name).observe(now - self.arrival)
        self.m.prompt_len.labels(name).observe(prompt_tokens)
        longest = max((n for n, _ in outputs), default=0)
        if self.first is not None and longest > 1:
            self.m.tpot.labels(name).observe((now - self.first) / (longest - 1))
        for num_tokens, reason in outputs:
            self.m.output_len.labels(name).observe(num_tokens)
            self.m.success.labels(name, reason or "unknown").inc()
        self._phases(engine_times)

    def _phases(self, t: Any) -> None:
        """Queue, prefill, decode and inference times from the engine's timestamps (when it has them)."""
        scheduled = getattr(t, "first_scheduled_time", None)
        if scheduled is None:  # aborted while waiting, or an engine without the timestamps
            return
        name, first, end = self.m.model_name, t.first_token_time, t.finished_time
        self.m.queue.labels(name).observe(max(0.0, scheduled - t.arrival_time))
        if first is not None:
            self.m.prefill.labels(name).observe(max(0.0, first - scheduled))
            if end is not None:
                self.m.decode.labels(name).observe(max(0.0, end - first))
        if end is not None:
            self.m.inference.labels(name).observe(max(0.0, end - scheduled))
