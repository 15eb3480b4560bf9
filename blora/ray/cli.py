"""``blora serve --ray``: deploy the application on a local Ray cluster (started here) or an existing one
(``--ray-address``), serve HTTP through Serve's proxy on ``--host``/``--port``, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger("blora.ray")

APP_NAME = "blora"


def _absolute(path: str) -> str:
    """Replicas may run in another directory (or on another node): local paths are made absolute."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def app_from_args(args: argparse.Namespace) -> Any:
    """The Serve application for ``blora serve`` options (the Ray ones included)."""
    from blora.models.loader import DEFAULT_MODEL
    from blora.ray.app import ClusterConfig, build_app
    from blora.server import cli

    cli._check_args(args)
    replicas = args.replicas or 2
    model = _absolute(args.model) if args.model else None
    engine_kwargs = cli.engine_kwargs(args, model)
    server = cli.server_config(
        args,
        model_source=model or DEFAULT_MODEL,
        max_num_seqs=replicas * args.max_num_seqs,
        adapter_root=args.adapter_root.resolve() if args.adapter_root else None,
    )
    cluster = ClusterConfig(
        replicas=replicas,
        max_adapters_per_replica=args.max_adapters_per_replica or args.max_loras,
        affinity=not args.no_adapter_affinity,
        replica_cpus=1.0 if args.replica_cpus is None else args.replica_cpus,
        replica_gpus=args.replica_gpus or 0.0,
    )
    adapters = {name: _absolute(path) for name, path in args.lora_modules}
    return build_app(engine_kwargs, server, cluster, adapters)


def _connect(address: str | None, replicas: int, replica_cpus: float) -> None:
    import ray

    if address:
        ray.init(address=address)
        return
    need, have = replicas * replica_cpus, os.cpu_count() or 1
    if need > have:
        raise SystemExit(
            f"{replicas} replicas x {replica_cpus} CPUs need {need:g} CPUs; this machine has {have}. "
            "Lower --replica-cpus (e.g. 0.5) or --replicas, or join a cluster with --ray-address"
        )
    ray.init(address="local")


def run_ray_serve(args: argparse.Namespace) -> int:
    """Deploy, serve until SIGTERM/SIGINT, then drain (503 for new requests) and remove the application."""
    try:
        from ray import serve
    except ImportError as exc:
        raise SystemExit("--ray needs Ray Serve: pip install 'blora[ray]'") from exc

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = app_from_args(args)
    _connect(args.ray_address, args.replicas or 2, 1.0 if args.replica_cpus is None else args.replica_cpus)
    stop = _handle_signals()  # after ray.init, which sets a SIGTERM handler of its own
    serve.start(http_options={"host": args.host, "port": args.port})
    handle = serve.run(app, name=APP_NAME, route_prefix="/")
    logger.info("serving on http://%s:%d with %d engine replica(s)", args.host, args.port, args.replicas or 2)
    while not stop.wait(0.5):
        pass
    logger.info("draining for up to %.1f s", args.drain_timeout)
    try:
        handle.drain.remote(args.drain_timeout).result(timeout_s=args.drain_timeout + 10)
    finally:
        serve.delete(APP_NAME)
        if not args.ray_address:
            serve.shutdown()
    return 0


def _handle_signals() -> threading.Event:
    """An event set by the first SIGTERM/SIGINT (also one received while deploying); a second exits at once."""
    received = threading.Event()

    def handler(sig: int, frame: FrameType | None) -> None:
        if received.is_set():
            os._exit(1)
        received.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return received
