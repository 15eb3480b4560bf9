"""``blora serve --ray``: deploy the application on a local Ray cluster (started here) or an existing one
(``--ray-address``), serve HTTP through Serve's proxy on ``--host``/``--port``, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from types import FrameType

logger = logging.getLogger("blora.ray")

APP_NAME = "blora"


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
    from blora.ray.app import app_from_args

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
