"""The server against the offline engine: ``blora serve`` over HTTP vs ``LLM.generate``, same work.

Both load the embedded SmolLM2 default as ``blora serve`` does, in ``--dtype`` (float32 by default) with
``--threads`` torch threads, each in its own process, both kept warm for the whole run:

- engine: a worker process running ``LLM.generate`` on the benchmark's chat prompts (``blora.bench``'s
  workload: the prompts rendered with the chat template; ``k`` adapters assigned round-robin); after its
  warm-up it freezes its heap (``freeze_startup_heap``) as the server's processes do;
- async (``--async-engine``): the same prompts through ``AsyncLLM`` in a worker process, each request a
  ``generate`` stream read by an asyncio task: the server's engine thread and hand-off without HTTP, which
  splits the server's cost into the threaded engine's and the HTTP layer's;
- server: ``python -m blora.server`` (uvicorn; ``--engine-process`` as its default picks it, ``on`` with
  ``--in-process``) with the same adapters as ``--lora-modules``; the load generator is this process (``serve_load.stream_chat``: a raw asyncio client,
  one connection per request, that keeps the bytes and parses each stream once it has ended): every request
  streams ``/v1/chat/completions`` with the same prompt's user message (the server applies the same
  template) to its adapter;
- server-inproc (``--in-process``): the same server with ``--engine-process off`` (engine thread and HTTP
  in one process), to compare the two designs in the same rounds.

Every request generates exactly ``--new-tokens`` tokens (greedy, EOS ignored). For each setting (concurrent
requests x distinct adapters) the engine and the server alternate within a round (the order flips each
round); the table gives medians over rounds of output tok/s (all requests submitted at once, wall time
to the last token), of the per-round ratio server / engine (the machine's speed drifts between rounds),
and of TTFT p50 (engine: the request's first token time from the ``generate`` call; server: the first
content chunk from the request's send).

    .venv/bin/python benchmarks/serve_vs_engine.py                       # 32 and 128 streams, 0 and 16
    .venv/bin/python benchmarks/serve_vs_engine.py --rounds 5 --json bench_results/serve_vs_engine.json
    .venv/bin/python benchmarks/serve_vs_engine.py --dtype bfloat16 --in-process  # + the one-process server
    .venv/bin/python benchmarks/serve_vs_engine.py --table bench_results/serve_vs_engine.json  # its table again
    .venv/bin/python benchmarks/serve_vs_engine.py --only server --profile /tmp/server.raw  # + py-spy
    git worktree add /tmp/before <commit>    # before/after: that checkout's server in the same rounds
    .venv/bin/python benchmarks/serve_vs_engine.py --before /tmp/before

``--profile`` samples the server process and its engine process with py-spy while the rounds run and prints the share of samples
per thread (the engine thread, the event loop) and per cause (the innermost frame naming a known module).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from serve_load import free_port, pct, stop_server, stream_chat, wait_healthy  # noqa: E402

BASE = "base"


@dataclass
class Measured:
    """One timed run of one system on one setting."""

    system: (
        str  # "engine" | "async" | "server" | "server-before" (--before's) | "server-inproc" (--in-process)
    )
    requests: int
    adapters: int
    tok_s: float
    ttft_p50_ms: float
    prompt_tokens: int


# --- engine worker (its own process) ----------------------------------------------------------------


def engine_worker(args: argparse.Namespace) -> None:
    """Read ``RUN <requests> <adapters>`` lines on stdin; time one ``LLM.generate`` each; print RESULT.
    ``args.async_engine``: an ``AsyncLLM`` instead, every request its own ``generate`` stream consumed by an
    asyncio task (uvloop, as the server runs) in this process: the server's engine thread and hand-off
    without HTTP."""
    if args.async_engine:
        async_engine_worker(args)
        return
    import torch

    from blora.engine import LLM, SamplingParams
    from blora.engine.memory import freeze_startup_heap
    from blora.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(None, dtype=args.dtype)
    llm = LLM(loaded, **engine_kwargs(args))
    warm = warm_adapters(args)
    llm.generate(["Hi"] * len(warm), SamplingParams(max_tokens=2, temperature=0), adapters=warm)
    freeze_startup_heap()  # as the server's processes do: a full GC pass would stall this engine as well
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    def timed(texts: list[str], names: list[str | None]) -> tuple[float, list[float], int]:
        with torch.inference_mode():
            start = time.time()
            outs = llm.generate(texts, params, adapters=names)
            seconds = time.time() - start
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
        ttft = [o.metrics.first_token_time - start for o in outs]
        return seconds, ttft, sum(len(o.prompt_token_ids) for o in outs)

    serve_runs(args, loaded.tokenizer, timed)


def async_engine_worker(args: argparse.Namespace) -> None:
    import torch
    import uvloop

    from blora.engine import AsyncLLM, SamplingParams
    from blora.engine.memory import freeze_startup_heap

    torch.set_num_threads(args.threads)
    # The model is loaded by the engine thread, as ``blora serve`` does: a parallel op in this thread would
    # start a second OpenMP team, and GNU OpenMP then stops its workers spinning between ops (AsyncLLM).
    llm = AsyncLLM(None, dtype=args.dtype, **engine_kwargs(args))

    async def one(
        prompt: str, params: SamplingParams, adapter: str | None, start: float
    ) -> tuple[int, float]:
        first, tokens = None, 0
        async for out in llm.generate(prompt, params, adapter):
            tokens = len(out.outputs[0].token_ids)
            first = first if first is not None or not tokens else time.time() - start
        return tokens, first if first is not None else float("nan")

    async def run(texts: list[str], names: list, params: SamplingParams) -> list[tuple[int, float]]:
        start = time.time()
        return await asyncio.gather(*(one(t, params, a, start) for t, a in zip(texts, names, strict=True)))

    warm = warm_adapters(args)
    uvloop.run(run(["Hi"] * len(warm), warm, SamplingParams(max_tokens=2, temperature=0)))
    freeze_startup_heap()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    def timed(texts: list[str], names: list[str | None]) -> tuple[float, list[float], int]:
        start = time.time()
        outs = uvloop.run(run(texts, names, params))
        seconds = time.time() - start
        assert all(tokens == args.new_tokens for tokens, _ in outs)
        prompt_tokens = sum(len(llm.tokenizer.encode(t, add_special_tokens=False)) for t in texts)
        return seconds, [ttft for _, ttft in outs], prompt_tokens

    serve_runs(args, llm.tokenizer, timed)
    llm.close()


def adapter_paths(args: argparse.Namespace) -> list[Path]:
    return sorted(Path(args.adapter_dir).glob("bench-*"))[: max(args.adapters)]


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine settings both workers share (and the server gets as flags, ``launch_server``)."""
    paths = adapter_paths(args)
    return dict(
        adapters={p.name: str(p) for p in paths},
        max_loras=max(16, len(paths)),
        max_num_seqs=max(64, *args.requests),
        stream_interval=args.stream_interval,
    )


def warm_adapters(args: argparse.Namespace) -> list[str | None]:
    """One warm-up request per adapter (they load on first use) and one on the base model."""
    return [p.name for p in adapter_paths(args)] + [None]


def serve_runs(args: argparse.Namespace, tokenizer, timed) -> None:
    """Print READY, then for each ``RUN <requests> <adapters>`` line on stdin one timed run of the workload
    (``timed(texts, adapter names)`` -> seconds, each request's TTFT in seconds, prompt tokens) as RESULT."""
    from blora.bench.systems import workload

    print("READY", flush=True)
    for line in sys.stdin:
        _, n, k = line.split()
        texts, names = workload(tokenizer, SimpleNamespace(requests=int(n), k=int(k)))
        seconds, ttft, prompt_tokens = timed(texts, names)
        result = {
            "tok_s": len(texts) * args.new_tokens / seconds,
            "ttft_p50_ms": 1000 * statistics.median(ttft),
            "prompt_tokens": prompt_tokens,
        }
        print("RESULT " + json.dumps(result), flush=True)


class EngineWorker:
    """The engine worker, driven over its stdin/stdout."""

    def __init__(self, args: argparse.Namespace, adapter_dir: Path, system: str = "engine") -> None:
        self.system = system  # "engine" (LLM.generate) | "async" (AsyncLLM streams, no HTTP)
        cmd = [sys.executable, __file__, "--engine-worker", "--adapter-dir", str(adapter_dir)]
        cmd += ["--async-engine"] if system == "async" else []
        cmd += ["--dtype", args.dtype, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
        cmd += ["--stream-interval", str(args.stream_interval)]
        cmd += ["--requests", *map(str, args.requests), "--adapters", *map(str, args.adapters)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise SystemExit(f"engine worker exited with status {self.proc.wait()}")

    def run(self, requests: int, adapters: int) -> Measured:
        self.proc.stdin.write(f"RUN {requests} {adapters}\n")
        self.proc.stdin.flush()
        r = json.loads(self._expect("RESULT "))
        return Measured(self.system, requests, adapters, r["tok_s"], r["ttft_p50_ms"], r["prompt_tokens"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


# --- server -------------------------------------------------------------------------------------------


def launch_server(
    args: argparse.Namespace, adapters: dict[str, str], root: Path, log: Path, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    """``python -m blora.server`` of the checkout at ``root`` with the engine worker's limits (and ``extra``
    flags)."""
    port = free_port()
    cmd = [sys.executable, "-m", "blora.server", "--served-model-name", BASE, "--port", str(port),
           "--dtype", args.dtype, "--threads", str(args.threads), "--max-queue", "-1",
           "--max-num-seqs", str(max(64, *args.requests)), "--max-loras", str(max(16, len(adapters))),
           "--log-level", "warning"]  # fmt: skip
    if args.stream_interval != 1:
        cmd += ["--stream-interval", str(args.stream_interval)]
    cmd += extra
    if adapters:
        cmd += ["--lora-modules", *(f"{k}={v}" for k, v in adapters.items())]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(root))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 300, ("/health",))
    return proc, url


def record(pid: int, out: Path, gil: bool) -> subprocess.Popen:
    """py-spy sampling ``pid`` (every thread, raw collapsed stacks) until stopped."""
    cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--format", "raw"]
    cmd += ["--threads", "--subprocesses", "--nonblocking", "--rate", "50", "-o", str(out)]
    cmd += ["--gil"] if gil else []
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


async def run_server_async(url: str, requests: int, adapters: int, new_tokens: int) -> Measured:
    from blora.bench.workload import prompts

    messages = prompts(requests)
    models = [BASE if adapters == 0 else f"bench-{i % adapters:03d}" for i in range(requests)]
    start = time.perf_counter()
    results = await asyncio.gather(
        *(stream_chat(url, {"model": m}, msg, new_tokens) for m, msg in zip(models, messages, strict=True))
    )
    seconds = time.perf_counter() - start
    if any(r.completion_tokens != new_tokens for r in results):
        tokens = [r.completion_tokens for r in results]
        raise RuntimeError(f"a stream did not generate {new_tokens} tokens: {tokens}")
    ttft_ms = 1000 * pct([r.ttft_s for r in results], 50)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    return Measured("server", requests, adapters, requests * new_tokens / seconds, ttft_ms, prompt_tokens)


# --- profile summary ----------------------------------------------------------------------------------

# Where a sample lands: its innermost frame that names one of these (engine thread / event loop).
ENGINE_CAUSES = [
    ("sampler", "blora/engine/sampler.py"),
    ("detokenizer", "blora/engine/detokenizer.py"),
    ("outputs (increments)", "blora/engine/sequence.py"),
    ("scheduler, blocks", "blora/engine/scheduler.py"),
    ("scheduler, blocks", "blora/engine/block_manager.py"),
    ("stats", "stats (blora/engine"),
    ("model runner (batch)", "blora/engine/model_runner.py"),
    ("LoRA", "blora/lora/"),
    ("model forward (Python)", "blora/models/"),
    ("torch ops", "torch/"),
    ("handoff to the loop", "blora/engine/async_llm.py"),
]
LOOP_CAUSES = [
    ("JSON/SSE chunks", "pydantic"),
    ("JSON/SSE chunks", "json/"),
    ("render", "blora/server/render.py"),
    ("render", "blora/server/completions.py"),
    ("serving (jobs, merge)", "blora/server/serving.py"),
    ("metrics", "blora/server/metrics.py"),
    ("metrics", "prometheus_client"),
    ("AsyncLLM stream", "blora/engine/async_llm.py"),
    ("HTTP (starlette, uvicorn)", "starlette/"),
    ("HTTP (starlette, uvicorn)", "uvicorn/"),
    ("HTTP (starlette, uvicorn)", "anyio/"),
    ("request setup (tokenize, template)", "transformers/"),
    ("asyncio / uvloop", "asyncio/"),
]


def summarize(raw: Path) -> str:
    """Share of py-spy samples (raw collapsed stacks, ``--threads``) per thread and per cause."""
    counts: dict[tuple[str, str], int] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = "engine" if "blora-engine" in frames[0] else "loop" if "uvicorn" in stack else "other"
        causes = ENGINE_CAUSES if thread == "engine" else LOOP_CAUSES
        cause = next((c for f in reversed(frames) for c, key in causes if key in f), "rest")
        counts[(thread, cause)] = counts.get((thread, cause), 0) + int(n)
    total = sum(counts.values()) or 1
    lines = ["| thread | cause | share of samples |", "|---|---|---|"]
    for (thread, cause), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {thread} | {cause} | {100 * n / total:.2f}% |")
    return "\n".join(lines)


# --- driver -------------------------------------------------------------------------------------------


def table(rows: list[Measured], args: argparse.Namespace) -> str:
    systems = ["engine", *(["async"] if args.async_engine else []), "server"]
    systems += ["server-before"] if args.before else []
    systems += ["server-inproc"] if args.in_process else []
    head = "| streams | adapters | " + " | ".join(f"{x} tok/s" for x in systems)
    head += "".join(f" | {x} / engine" for x in systems[1:]) + "".join(
        f" | {x} TTFT p50 (ms)" for x in systems
    )
    lines = [
        f"{args.dtype}, {args.threads} threads, {args.new_tokens} new tokens per request, medians of "
        f"{args.rounds} alternated rounds (ratios: median of each round's ratio)\n",
        head + " |",
        "|---" * (2 + 2 * len(systems) + len(systems) - 1) + "|",
    ]
    for n in args.requests:
        for k in args.adapters:

            def values(system: str, field: str, n: int = n, k: int = k) -> list[float]:
                """The system's measurements of this setting, in round order."""
                return [
                    getattr(r, field) for r in rows if (r.system, r.requests, r.adapters) == (system, n, k)
                ]

            def med(xs: list[float]) -> float:
                return statistics.median(xs) if xs else float("nan")

            tok = {x: values(x, "tok_s") for x in systems}
            # each round's ratio to the engine of the same round: the machine drifts between rounds
            ratios = [med([a / b for a, b in zip(tok[x], tok["engine"], strict=False)]) for x in systems[1:]]
            cells = [f"{med(tok[x]):.1f}" for x in systems] + [f"{q:.3f}" for q in ratios]
            cells += [f"{med(values(x, 'ttft_p50_ms')):.0f}" for x in systems]
            lines.append(f"| {n} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_of(saved: list[dict], args: argparse.Namespace) -> str:
    """``table`` of the measurements a run wrote with ``--json`` (pass the run's ``--dtype``)."""
    rows = [Measured(**r) for r in saved]
    systems = {r.system for r in rows}
    args.requests = list(dict.fromkeys(r.requests for r in rows))
    args.adapters = list(dict.fromkeys(r.adapters for r in rows))
    args.async_engine, args.before = "async" in systems, "server-before" in systems
    args.in_process = "server-inproc" in systems
    args.rounds = sum(r.system == "engine" for r in rows) // (len(args.requests) * len(args.adapters))
    return table(rows, args)


def warm_server(url: str, adapters: int) -> None:
    models = [BASE, *(f"bench-{i:03d}" for i in range(adapters))]
    asyncio.run(_warm(url, models))


async def _warm(url: str, models: list[str]) -> None:
    for m in models:
        await stream_chat(url, {"model": m}, "Hi", 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, nargs="+", default=[32, 128], help="concurrent streams")
    p.add_argument("--adapters", type=int, nargs="+", default=[0, 16], help="distinct adapters (0: base)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--stream-interval", type=int, default=1, help="the server's (and AsyncLLM's) --stream-interval"
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adapter-cache", type=Path, default=Path("/tmp/blora-bench-adapters"))
    p.add_argument("--only", choices=["engine", "server"], default=None, help="measure one system")
    p.add_argument(
        "--before", type=Path, default=None, help="also the server of this checkout (a before/after column)"
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="the server with --engine-process on, and beside it with off (engine thread and HTTP in one process)",
    )
    p.add_argument(
        "--async-engine",
        action="store_true",
        help="also AsyncLLM in a process of its own, streams consumed by asyncio tasks (no HTTP)",
    )
    p.add_argument("--profile", type=Path, default=None, help="record the server with py-spy (raw format)")
    p.add_argument("--gil", action="store_true", help="with --profile: only samples holding the GIL")
    p.add_argument("--json", type=Path, default=None, help="write every measurement here")
    p.add_argument("--table", type=Path, default=None, help="print the table of a --json file and exit")
    p.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--adapter-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine_worker:
        engine_worker(args)
        return
    if args.table:
        print(table_of(json.loads(args.table.read_text()), args))
        return

    from blora.bench.throughput import prepare_adapters

    adapter_dir = prepare_adapters(None, args.dtype, args.adapter_cache, max(args.adapters))
    paths = sorted(adapter_dir.glob("bench-*"))[: max(args.adapters)]
    workers = {}
    if args.only != "server":
        workers["engine"] = EngineWorker(args, adapter_dir)
        if args.async_engine:
            workers["async"] = EngineWorker(args, adapter_dir, "async")
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    if args.only != "engine":
        roots = {"server": (REPO, ("--engine-process", "on") if args.in_process else ())}
        if args.before:
            roots["server-before"] = (args.before.resolve(), ())
        if args.in_process:
            roots["server-inproc"] = (REPO, ("--engine-process", "off"))
        for name, (root, extra) in roots.items():
            log = Path(tempfile.gettempdir()) / f"blora-serve-vs-engine-{name}.log"
            servers[name] = launch_server(args, {q.name: str(q) for q in paths}, root, log, extra)
            warm_server(servers[name][1], max(args.adapters))
    spy = record(servers["server"][0].pid, args.profile, args.gil) if args.profile and servers else None
    systems = [*workers, *servers]
    rows: list[Measured] = []
    try:
        for r in range(args.rounds):
            for n in args.requests:
                for k in args.adapters:
                    for system in systems[r % len(systems) :] + systems[: r % len(systems)]:  # rotated
                        if system in workers:
                            rows.append(workers[system].run(n, k))
                        else:
                            m = asyncio.run(run_server_async(servers[system][1], n, k, args.new_tokens))
                            rows.append(dataclasses.replace(m, system=system))
                        m = rows[-1]
                        print(
                            f"round {r} {m.system:13s} {n:4d} streams {k:2d} adapters: {m.tok_s:7.1f} tok/s, "
                            f"TTFT p50 {m.ttft_p50_ms:6.0f} ms, {m.prompt_tokens} prompt tokens",
                            flush=True,
                        )
    finally:
        for worker in workers.values():
            worker.close()
        if spy is not None:
            stop_server(spy, 120)
        for proc, _ in servers.values():
            stop_server(proc, 120)
    print(table(rows, args))
    if args.profile and args.profile.exists():
        print(f"\nserver profile ({args.profile}; samples of running threads, idle ones left out)\n")
        print(summarize(args.profile))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
