"""``python -m blora.server`` (and ``blora serve`` without ``--ray``): one engine behind uvicorn.

The options are ``blora.server.options``'s (the same for every entry point); this module loads the engine
they describe and serves it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from blora.server.options import (
    add_serve_arguments,
    check_args,
    engine_args,
    sampling_defaults,
    server_config,
)

if TYPE_CHECKING:
    from blora.engine.client import EngineClient

logger = logging.getLogger("blora.server")


def build_engine(args: argparse.Namespace) -> EngineClient:
    """The engine the options describe, serving ``--lora-modules`` from the start: in a child process or in
    this one (``engine_in_process``)."""
    adapters = dict(args.lora_modules) or None
    if not engine_in_process(args):
        from blora.engine.process import EngineProcess

        return EngineProcess(
            adapters=adapters,
            threads=args.threads,
            log_level=args.log_level.upper(),
            **engine_args(args).kwargs(),
        )
    from blora.engine import AsyncLLM

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return AsyncLLM(adapters=adapters, **engine_args(args).kwargs())


def engine_in_process(args: argparse.Namespace) -> bool:
    """``--engine-process``: "on" / "off" as given; "auto": a child process on a GPU (fast steps, where the
    GIL matters most) or when the engine's threads leave a CPU core for the server; one process when the
    engine's threads take every core (measured on 2 cores: the same throughput under load, ~5% more for a
    single stream and ~0.3 GB less memory in one process)."""
    if args.engine_process != "auto":
        return args.engine_process == "off"
    import torch

    from blora.models.device import resolve_device

    if resolve_device(args.device).type != "cpu":
        return False
    threads = args.threads or torch.get_num_threads()
    return threads >= (os.cpu_count() or 1)


def run_serve(args: argparse.Namespace) -> int:
    """Load the engine, then serve until SIGTERM/SIGINT (drains first; exits 0)."""
    import uvicorn

    from blora.engine.memory import freeze_startup_heap
    from blora.server.app import create_app
    from blora.server.lifecycle import DrainingServer

    check_args(args)
    if args.ray:  # the server layer never imports blora.ray: the top-level CLI dispatches there
        raise SystemExit(
            "--ray: start it with `blora serve --ray ...` (python -m blora.server serves one engine)"
        )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine = build_engine(args)
    config = server_config(args, sampling_defaults=sampling_defaults(args))
    name = config.served_model_name
    app = create_app(engine, config)
    freeze_startup_heap()  # the startup heap out of the collector's full passes (a stall of every stream)
    uv_config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
        access_log=args.log_level == "debug", ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs, root_path=args.root_path,
    )  # fmt: skip
    server = DrainingServer(uv_config, app.state.lifecycle, engine, args.drain_timeout)
    logger.info("serving %r on http://%s:%d (adapters: %s)", name, args.host, args.port,
                ", ".join(engine.list_adapters()) or "none")  # fmt: skip
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_serve_arguments(argparse.ArgumentParser(prog="blora serve", description=__doc__))
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
