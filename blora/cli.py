"""``blora demo | generate | bench | serve``."""

from __future__ import annotations

import argparse
import sys


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 where native)"
    )
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def _demo_parser(sub) -> None:
    from blora.demo.run import DEFAULT_QUESTION

    p = sub.add_parser("demo", help="base model + four demo adapters in one batch, streamed side by side")
    p.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument(
        "--live", action=argparse.BooleanOptionalAction, default=None, help="force live panels on/off"
    )
    p.add_argument(
        "--library",
        action="store_true",
        help="run the rows through the library API (load_loras / prepare_batch / generate) instead of the engine",
    )
    p.add_argument(
        "--compare", action="store_true", help="then run the same rows through transformers + PEFT; one line"
    )
    _add_model_args(p)


def _bench_parser(sub) -> None:
    from blora.bench.throughput import add_bench_arguments

    p = sub.add_parser(
        "bench",
        help="throughput: engine (base-only, N adapters) vs transformers vs PEFT mixed; table and plot",
        description="Throughput of the blora engine (base-only and with N adapters), transformers generate "
        "and PEFT's mixed batch on one workload, each system in its own process; prints the table and "
        "writes OUT.json, OUT.md and OUT.png. A few minutes with the defaults; --tiny for a smoke run.",
    )
    add_bench_arguments(p)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate for prompts, each through its own adapter (engine)")
    p.add_argument("prompts", nargs="+", help="prompts; prefix with NAME: to route through adapter NAME")
    p.add_argument(
        "--model", default=None, help="HF dir, hub id in the local cache, or .gguf (default: SmolLM2)"
    )
    p.add_argument(
        "--lora", action="append", default=[], metavar="NAME=PATH", help="adapter to load (repeat)"
    )
    p.add_argument("--demo-adapters", action="store_true", help="load the four demo adapters")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=True, help="apply the chat template"
    )
    _add_model_args(p)


def _run_generate(args) -> int:
    from blora import LLM, SamplingParams

    adapters = {}
    for spec in args.lora:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora expects NAME=PATH, got {spec!r}")
        adapters[name] = path
    if args.demo_adapters:
        from blora.demo.behaviours import ADAPTER_NAMES, adapter_path

        adapters.update({n: str(adapter_path(n)) for n in ADAPTER_NAMES})
    prompts, routes = [], []
    for text in args.prompts:
        name, sep, rest = text.partition(":")
        if sep and name in adapters:
            prompts.append(rest.strip())
            routes.append(name)
        else:
            prompts.append(text)
            routes.append(None)
    llm = LLM(model=args.model, adapters=adapters, dtype=args.dtype, device=args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.chat:
        messages = [[{"role": "user", "content": p}] for p in prompts]
        outs = llm.chat(messages, sampling_params=params, adapters=routes)
    else:
        outs = llm.generate(prompts, sampling_params=params, adapters=routes)
    for prompt, route, out in zip(prompts, routes, outs, strict=True):
        print(f"[{route or 'base'}] {prompt}\n{out.outputs[0].text}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blora", description="Batched multi-LoRA inference")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _generate_parser(sub)
    _bench_parser(sub)
    from blora.server.options import add_serve_arguments, check_args

    add_serve_arguments(sub.add_parser("serve", help="OpenAI-compatible server"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        check_args(args)  # before anything loads, for both the single engine and --ray
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "demo":
        from blora.demo.run import run_demo

        run_demo(
            args.question,
            max_new_tokens=args.max_tokens,
            dtype=args.dtype,
            device=args.device,
            live=args.live,
            library=args.library,
            compare=args.compare,
        )
        return 0
    if args.command == "bench":
        from blora.bench.throughput import bench_command

        return bench_command(args)
    if args.command == "generate":
        return _run_generate(args)
    from blora.server.cli import run_serve

    if args.ray:  # only this top-level CLI reaches into blora.ray (the layers below never import it)
        from blora.ray.cli import run_ray_serve

        return run_ray_serve(args)
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
