"""``blora serve``: argument parsing and the uvicorn runner.

The lead wires ``add_serve_arguments`` / ``run_serve`` into ``blora serve``; ``python -m blora.server``
runs the same thing on its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("blora.server")


def _lora_module(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules expects name=path, got {spec!r}")
    return name, path


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``serve`` options to ``parser`` (a sub-command parser of ``blora``)."""
    from blora.engine.llm_engine import EngineConfig  # the one set of engine defaults

    a = parser.add_argument
    a(
        "--model",
        default=None,
        help="HF directory, hub id or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    a("--served-model-name", default=None, help="model id clients use for the base model (default: --model)")
    a("--lora-modules", nargs="+", type=_lora_module, default=[], metavar="NAME=PATH",
      help="adapters to serve from startup; each NAME becomes a model id")  # fmt: skip
    a("--adapter-root", type=Path, default=None, help="directory that runtime-loaded adapters must live in")
    a("--allow-runtime-adapters", action="store_true",
      help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --adapter-root)")  # fmt: skip
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a(
        "--api-key",
        default=os.environ.get("BLORA_API_KEY"),
        help="require 'Authorization: Bearer KEY' (env BLORA_API_KEY)",
    )
    a("--max-loras", type=int, default=EngineConfig.max_loras, help="distinct adapters in one engine step")
    a("--max-lora-rank", type=int, default=None,
      help="refuse adapters of a higher rank (checked on adapter_config.json, before the weights are read)")  # fmt: skip
    a("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs, help="sequences in the running batch")
    a(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + output tokens per request (default: the model's)",
    )
    a("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
      help="tokens per engine step (prefill chunk)")  # fmt: skip
    a("--num-kv-blocks", type=int, default=None, help="KV-cache size in blocks (default: sized from memory)")
    a("--seed", type=int, default=EngineConfig.seed, help="engine seed for requests without their own seed")
    a("--lora-backend", default=EngineConfig.lora_backend,
      help="how the LoRA math runs: auto | cpu (C++ kernel + GEMMs) | torch (PyTorch ops) (default: auto)")  # fmt: skip
    a("--fast-path", choices=("auto", "on", "off"), default=EngineConfig.fast_path,
      help="the engine's own forward for Llama-family models: auto (where it is faster: CPU with AVX-512), "
           "on (on any CPU the kernels build for), off (transformers' modules)")  # fmt: skip
    a("--cpu-kernel", action=argparse.BooleanOptionalAction, default=EngineConfig.cpu_kernel,
      help="the C++ CPU kernels (LoRA, decode attention, fast path); --no-cpu-kernel: PyTorch ops only")  # fmt: skip
    a("--packed-weights", action=argparse.BooleanOptionalAction, default=EngineConfig.packed_weights,
      help="oneDNN-prepacked weights on the fast path (a second copy of the linear weights)")  # fmt: skip
    a("--max-queue", type=int, default=256,
      help="requests that may wait beyond --max-num-seqs before new ones get 429 (-1: unbounded)")  # fmt: skip
    a("--retry-after", type=int, default=1, help="Retry-After seconds sent with 429")
    a("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests")
    a("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (larger: 413)")
    a("--max-prompt-chars", type=int, default=None,
      help="longest prompt (or chat messages) in characters, checked before tokenization "
           "(default: --max-model-len x the tokenizer's longest token)")  # fmt: skip
    a("--disable-docs", action="store_true",
      help="remove /docs, /redoc and /openapi.json (otherwise public without --api-key, behind it with one)")  # fmt: skip
    a("--dtype", default=None, help="float32 | bfloat16 | float16 (default: per device)")
    a("--device", default=None, help="cpu | cuda | mps (default: best available)")
    a("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_ray_arguments(parser)
    return parser


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray``: N engine replicas behind one ingress on Ray Serve (``blora.ray``; ``blora[ray]`` extra)."""
    g = parser.add_argument_group("Ray Serve scale-out (pip install 'blora[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve from engine replicas on a Ray cluster, routed by adapter (see blora.ray)")  # fmt: skip
    g.add_argument("--replicas", type=int, default=None, help="engine replicas (default 2)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (HOST:6379 or auto); default: start a local one")  # fmt: skip
    g.add_argument("--max-adapters-per-replica", type=int, default=None,
                   help="adapters resident in one replica, LRU beyond (default: --max-loras)")  # fmt: skip
    g.add_argument("--replica-cpus", type=float, default=None, help="Ray CPUs per replica (default 1)")
    g.add_argument("--replica-gpus", type=float, default=None, help="Ray GPUs per replica (default 0)")
    g.add_argument("--no-adapter-affinity", action="store_true",
                   help="route with Ray's default policy instead of by adapter (for comparison)")  # fmt: skip


def _check_args(args: argparse.Namespace) -> None:
    if args.allow_runtime_adapters and args.adapter_root is None:
        raise SystemExit("--allow-runtime-adapters needs --adapter-root DIR")
    if args.adapter_root is not None and not args.adapter_root.is_dir():
        raise SystemExit(f"--adapter-root {args.adapter_root} is not a directory")
    names = [name for name, _ in args.lora_modules]
    if len(set(names)) != len(names):
        raise SystemExit(f"--lora-modules has duplicate names: {names}")
    ray_only = ["replicas", "ray_address", "max_adapters_per_replica", "replica_cpus", "replica_gpus"]
    given = [f"--{k.replace('_', '-')}" for k in ray_only if getattr(args, k, None) is not None]
    if getattr(args, "no_adapter_affinity", False):
        given.append("--no-adapter-affinity")
    if given and not getattr(args, "ray", False):
        raise SystemExit(f"{', '.join(given)} only apply with --ray")
    if args.max_body_mb <= 0 or (args.max_prompt_chars is not None and args.max_prompt_chars < 1):
        raise SystemExit("--max-body-mb and --max-prompt-chars must be positive")
    if getattr(args, "replicas", None) is not None and args.replicas < 1:
        raise SystemExit(f"--replicas must be >= 1, got {args.replicas}")


def engine_kwargs(args: argparse.Namespace, model: str | None) -> dict:
    """``AsyncLLM`` arguments from the ``blora serve`` options (adapters aside)."""
    return dict(
        model=model,
        dtype=args.dtype,
        device=args.device,
        max_loras=args.max_loras,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        seed=args.seed,
        max_lora_rank=args.max_lora_rank,
        lora_backend=args.lora_backend,
        fast_path=args.fast_path,
        cpu_kernel=args.cpu_kernel,
        packed_weights=args.packed_weights,
    )


def server_config(args: argparse.Namespace, **overrides):
    """``ServerConfig`` from the ``blora serve`` options; ``overrides`` for what the caller decides
    (``served_model_name``, ``model_source``, ``max_num_seqs``, ``adapter_root``)."""
    from blora.models.loader import DEFAULT_MODEL
    from blora.server.app import ServerConfig

    fields = dict(
        served_model_name=args.served_model_name or args.model or DEFAULT_MODEL,
        model_source=args.model or DEFAULT_MODEL,
        api_key=args.api_key or None,
        max_num_seqs=args.max_num_seqs,
        max_queue=None if args.max_queue < 0 else args.max_queue,
        max_loras=args.max_loras,
        adapter_root=args.adapter_root,
        allow_runtime_adapters=args.allow_runtime_adapters,
        retry_after_s=args.retry_after,
        drain_timeout_s=args.drain_timeout,
        disable_docs=args.disable_docs,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_prompt_chars=args.max_prompt_chars,
    )
    return ServerConfig(**{**fields, **overrides})


def build_engine(args: argparse.Namespace):
    from blora.engine import AsyncLLM

    return AsyncLLM(adapters=dict(args.lora_modules) or None, **engine_kwargs(args, args.model))


def run_serve(args: argparse.Namespace) -> int:
    """Load the engine, then serve until SIGTERM/SIGINT (drains first; exits 0)."""
    import uvicorn

    from blora.models.loader import DEFAULT_MODEL
    from blora.server.app import create_app
    from blora.server.lifecycle import DrainingServer

    _check_args(args)
    if args.ray:
        from blora.ray.cli import run_ray_serve

        return run_ray_serve(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine = build_engine(args)
    config = server_config(
        args, model_source=str(getattr(engine, "model_source", None) or args.model or DEFAULT_MODEL)
    )
    name = config.served_model_name
    app = create_app(engine, config)
    uv_config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
        access_log=args.log_level == "debug",
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
