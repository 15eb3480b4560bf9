"""The Serve application: ``OpenAIIngress`` -> ``EngineReplica`` x N, both reading ``AdapterRegistry``.

``build_app`` is the Python entry point (``serve.run(build_app(...))``), ``app_builder`` the one for
``serve run blora.ray:app_builder replicas=2 ...`` (keys are ``blora serve``'s options), and
``blora serve --ray`` (``blora.ray.cli``) runs the same application, built by ``app_from_args`` from the
options of ``blora.server.options``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from ray import serve

from blora.engine.llm_engine import EngineConfig
from blora.models.loader import DEFAULT_MODEL
from blora.ray.cluster_engine import ClusterEngine
from blora.ray.registry import AdapterRegistry
from blora.ray.replica import EngineReplica, ReplicaOptions
from blora.server.app import ServerConfig, create_app
from blora.server.lifecycle import Lifecycle
from blora.server.options import (
    add_serve_arguments,
    check_args,
    engine_args,
    sampling_defaults,
    server_config,
)


@dataclass
class ClusterConfig:
    """How the engine is spread over the cluster.

    ``replicas``: engine replicas (one ``AsyncLLM`` each). ``max_adapters_per_replica``: adapters resident
    in one replica at once (Ray's ``max_num_models_per_replica``; LRU beyond). ``affinity``: route adapter
    requests with Ray's model multiplexing (False: Ray's default routing, for comparison).
    ``replica_cpus`` / ``replica_gpus``: Ray resources per replica; ``threads``: torch threads per replica
    (default: ``replica_cpus``, at least 1).
    """

    replicas: int = 2
    max_adapters_per_replica: int = 16
    affinity: bool = True
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    threads: int | None = None
    report_interval_s: float = 0.5


class ClusterCollector:
    """Per-replica routing figures on the ingress's ``/metrics``, next to the server's own metrics."""

    def __init__(self, engine: ClusterEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "replica"]
        live = GaugeMetricFamily("blora:cluster_replicas", "Engine replicas that reported recently.", labels=["model_name"])  # fmt: skip
        requests = CounterMetricFamily("blora:replica_adapter_requests", "Adapter requests that reached a replica, by whether their adapter was already resident there.", labels=[*labels, "resident"])  # fmt: skip
        loads = CounterMetricFamily("blora:replica_adapter_loads", "Adapters a replica read and made resident.", labels=labels)  # fmt: skip
        evictions = CounterMetricFamily("blora:replica_adapter_evictions", "Adapters a replica's LRU evicted.", labels=labels)  # fmt: skip
        resident = GaugeMetricFamily("blora:replica_resident_adapters", "Adapters resident in a replica.", labels=labels)  # fmt: skip
        reports = self.engine.replica_reports()
        live.add_metric([self.model_name], sum(alive for alive, _ in reports.values()))
        for name, (alive, s) in sorted(reports.items()):
            key = [self.model_name, name]
            hits = s.get("adapter_hits", 0)
            requests.add_metric([*key, "true"], hits)
            requests.add_metric([*key, "false"], s.get("adapter_requests", 0) - hits)
            loads.add_metric(key, s.get("adapter_loads", 0))
            evictions.add_metric(key, s.get("adapter_evictions", 0))
            if alive:
                resident.add_metric(key, len(s.get("resident_adapters", ())))
        yield from (live, requests, loads, evictions, resident)


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class OpenAIIngress:
    """The single-process server's FastAPI app (``create_app``) over a ``ClusterEngine``."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, replicas: Any, registry: Any, config: ServerConfig, affinity: bool
    ) -> None:
        info = await replicas.describe.remote()
        self.config = config
        self.engine = ClusterEngine(replicas, registry, info, affinity, retry_after_s=config.retry_after_s)
        self.lifecycle: Lifecycle | None = None
        await self.engine.start()

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.engine, self.config)
        app.state.metrics.registry.register(ClusterCollector(self.engine, self.config.served_model_name))
        self.lifecycle = app.state.lifecycle
        return app

    async def drain(self, timeout: float) -> None:
        """``blora serve --ray``'s SIGTERM: 503 for new requests, in-flight ones finish or are aborted."""
        if self.lifecycle is not None:  # None: the app was never built, so nothing is in flight
            await self.lifecycle.drain(self.engine, timeout)


def deployment(decorated: object) -> serve.Deployment:
    """A ``@serve.deployment`` class as the ``Deployment`` it is at run time (mypy sees the class)."""
    return cast(serve.Deployment, decorated)


def build_app(
    engine_kwargs: dict[str, Any],
    server: ServerConfig,
    cluster: ClusterConfig | None = None,
    adapters: dict[str, str] | None = None,
) -> serve.Application:
    """The Serve application. ``engine_kwargs``: ``AsyncLLM``'s arguments for every replica (without
    ``adapters``); ``adapters``: name -> path served from the start, loaded by each replica on first use
    (the paths must exist on every node). ``server.max_num_seqs`` is the cluster's running batch (usually
    ``replicas`` x the engine's ``max_num_seqs``): with ``max_queue`` it bounds the ingress's queue (429)."""
    cluster = cluster or ClusterConfig()
    if cluster.replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {cluster.replicas}")
    if "adapters" in engine_kwargs:
        raise ValueError("pass adapters to build_app, not in engine_kwargs: replicas load them on first use")
    queue = server.max_queue if server.max_queue is not None else 10_000
    # Serve holds back nothing the engine queues
    per_replica = engine_kwargs.get("max_num_seqs", EngineConfig.max_num_seqs) + queue
    threads = cluster.threads or max(1, int(cluster.replica_cpus))
    options = ReplicaOptions(
        cluster.max_adapters_per_replica, threads, cluster.report_interval_s, server.drain_timeout_s
    )
    registry = deployment(AdapterRegistry).bind(dict(adapters or {}))
    replica = deployment(EngineReplica).options(
        num_replicas=cluster.replicas,
        max_ongoing_requests=per_replica,
        graceful_shutdown_timeout_s=server.drain_timeout_s,
        ray_actor_options={"num_cpus": cluster.replica_cpus, "num_gpus": cluster.replica_gpus},
    )
    replicas = replica.bind(dict(engine_kwargs), registry, options)
    ingress = deployment(OpenAIIngress).options(
        max_ongoing_requests=server.max_num_seqs + queue + 64,  # the app answers 429 itself, before Serve
        graceful_shutdown_timeout_s=server.drain_timeout_s,
    )
    return ingress.bind(replicas, registry, server, cluster.affinity)


def app_builder(args: dict[str, str]) -> serve.Application:
    """For ``serve run blora.ray:app_builder replicas=2 lora-modules="a=/p b=/q" ...``: every key is a
    ``blora serve`` option (``-`` or ``_``), flags take ``true``/``false``."""
    parser = add_serve_arguments(argparse.ArgumentParser(prog="serve run blora.ray:app_builder"))
    return app_from_args(parser.parse_args(["--ray", *builder_argv(parser, args)]))


def builder_argv(parser: argparse.ArgumentParser, args: dict[str, str]) -> list[str]:
    """``{"replicas": "2", "allow_runtime_adapters": "true"}`` -> ``["--replicas", "2", "--allow-..."]``."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        action = parser._option_string_actions.get(flag)
        if action is None:
            raise ValueError(f"unknown option {key!r}; the keys are `blora serve --help`'s options")
        text = str(value)
        if action.nargs == 0:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{key} is a flag: pass {key}=true or {key}=false, not {text!r}")
            if text.lower() in ("true", "1", "yes"):
                argv.append(flag)
        elif action.nargs == "+":
            argv += [flag, *text.split()]
        else:
            argv += [flag, text]
    return argv


def _absolute(path: str) -> str:
    """Replicas may run in another directory (or on another node): local paths are made absolute."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    """The ``ClusterConfig`` of the ``blora serve --ray`` options."""
    return ClusterConfig(
        replicas=args.replicas or 2,
        max_adapters_per_replica=args.max_adapters_per_replica or args.max_loras,
        affinity=not args.no_adapter_affinity,
        replica_cpus=1.0 if args.replica_cpus is None else args.replica_cpus,
        replica_gpus=args.replica_gpus or 0.0,
    )


def app_from_args(args: argparse.Namespace) -> serve.Application:
    """The Serve application for ``blora serve`` options (the Ray ones included): the engine and server
    of ``blora.server.options``, with local paths made absolute for the replicas."""
    check_args(args)
    cluster = cluster_config(args)
    engine = engine_args(args)
    if engine.model is not None:
        engine = dataclasses.replace(engine, model=_absolute(engine.model))
    server = server_config(
        args,
        model_source=engine.model or DEFAULT_MODEL,
        max_num_seqs=cluster.replicas * args.max_num_seqs,
        adapter_root=args.adapter_root.resolve() if args.adapter_root else None,
        sampling_defaults=sampling_defaults(args),
    )
    adapters = {name: _absolute(path) for name, path in args.lora_modules}
    return build_app(engine.kwargs(), server, cluster, adapters)
