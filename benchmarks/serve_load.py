"""Load test of an OpenAI-compatible server: Poisson arrivals, power-law adapter popularity.

Workload (seeded, identical for every server): requests arrive as a Poisson process at each rate; each
picks a model with Zipf popularity over K adapters (plus the base model with weight ``--base-share``),
a prompt length and an output length from fixed distributions. Every request streams
(``/v1/completions``), so the client measures time to first token (TTFT), time per output token after
the first (TPOT) and end-to-end latency. Reported per rate: achieved request throughput, output tok/s,
p50/p99 of TTFT / TPOT / e2e, and failures.

    # blora, 16 adapters, launched by the script (embedded SmolLM2 by default)
    python benchmarks/serve_load.py --launch blora --adapters 16 --rates 0.5 1 2 --duration 60
    # the same base-model workload against `transformers serve` (which refuses ignore_eos: compare
    # both servers with --no-ignore-eos; output tok/s counts the tokens actually generated)
    python benchmarks/serve_load.py --launch blora --adapters 0 --no-ignore-eos --rates 0.5 1 2
    python benchmarks/serve_load.py --launch transformers --adapters 0 --no-ignore-eos --rates 0.5 1 2
    # an already running server
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000 --model my-model --adapters 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROMPT_LENS = [(32, 0.4), (64, 0.3), (128, 0.2), (256, 0.1)]  # tokens, probability
OUTPUT_LENS = [(16, 0.3), (32, 0.4), (64, 0.3)]
WORDS = (  # noqa: SIM905
    "the moon bread volcano ocean chess bicycle rain music bee glacier internet train coffee paper desert owl "
    "history culture river mountain city garden library market winter summer story letter window bridge"
).split()


@dataclass
class Planned:
    arrival: float
    model: str
    prompt: str
    max_tokens: int


@dataclass
class Result:
    ok: bool
    status: int = 0
    error: str = ""
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    adapter: str = ""


@dataclass
class RateReport:
    rate: float
    requests: int
    failures: int
    duration_s: float
    req_per_s: float
    output_tok_per_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    e2e_p50: float
    e2e_p99: float
    errors: dict[str, int] = field(default_factory=dict)


def weighted(rng: random.Random, table: list[tuple[int, float]]) -> int:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


def zipf_models(base: str, adapters: list[str], s: float, base_share: float) -> tuple[list[str], list[float]]:
    """Models and weights: adapter i (1-based popularity rank) gets weight 1 / i**s; base gets base_share."""
    if not adapters:
        return [base], [1.0]
    raw = [1 / (i**s) for i in range(1, len(adapters) + 1)]
    scale = (1 - base_share) / sum(raw)
    return [base, *adapters], [base_share, *(w * scale for w in raw)]


def make_prompt(rng: random.Random, tokenizer, length: int) -> str:
    """A prompt of exactly ``length`` tokens (under ``tokenizer``) made of random words."""
    text = " ".join(rng.choice(WORDS) for _ in range(length * 2))
    ids = tokenizer.encode(text, add_special_tokens=False)[:length]
    return tokenizer.decode(ids)


def plan(args, tokenizer, rate: float, models: list[str], weights: list[float]) -> list[Planned]:
    rng = random.Random(args.seed * 1000 + int(rate * 100))
    n = args.num_requests or max(1, round(rate * args.duration))
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        model = rng.choices(models, weights=weights)[0]
        prompt = make_prompt(rng, tokenizer, weighted(rng, PROMPT_LENS))
        out.append(Planned(t, model, prompt, weighted(rng, OUTPUT_LENS)))
    return out


async def one_request(client: httpx.AsyncClient, args, p: Planned, t0: float) -> Result:
    await asyncio.sleep(max(0.0, t0 + p.arrival - time.perf_counter()))
    body = {
        "model": p.model,
        "prompt": p.prompt,
        "max_tokens": p.max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.include_usage:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    res = Result(ok=False, adapter=p.model)
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.error = str(data["error"])[:200]
                    return res
                if data.get("usage"):
                    res.output_tokens = data["usage"]["completion_tokens"]
                if data.get("choices") and data["choices"][0].get("text"):
                    chunks += 1
                    if res.ttft is None:
                        res.ttft = time.perf_counter() - start
        res.e2e = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "no tokens"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


async def run_rate(args, planned: list[Planned], rate: float) -> RateReport:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=args.timeout, limits=limits
    ) as c:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(c, args, p, t0) for p in planned))
        duration = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error.split(":")[0]] = errors.get(r.error.split(":")[0], 0) + 1
    return RateReport(
        rate=rate,
        requests=len(results),
        failures=len(results) - len(ok),
        duration_s=duration,
        req_per_s=len(ok) / duration,
        output_tok_per_s=sum(r.output_tokens for r in ok) / duration,
        ttft_p50=pct([r.ttft for r in ok], 50),
        ttft_p99=pct([r.ttft for r in ok], 99),
        tpot_p50=pct(tpot, 50),
        tpot_p99=pct(tpot, 99),
        e2e_p50=pct([r.e2e for r in ok], 50),
        e2e_p99=pct([r.e2e for r in ok], 99),
        errors=errors,
    )


def table(title: str, reports: list[RateReport]) -> str:
    head = (
        "| rate (req/s) | requests | failures | req/s | output tok/s | TTFT p50 / p99 (s) "
        "| TPOT p50 / p99 (ms) | e2e p50 / p99 (s) |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r.rate:g} | {r.requests} | {r.failures} | {r.req_per_s:.2f} | {r.output_tok_per_s:.1f} "
        f"| {r.ttft_p50:.2f} / {r.ttft_p99:.2f} | {1000 * r.tpot_p50:.0f} / {1000 * r.tpot_p99:.0f} "
        f"| {r.e2e_p50:.2f} / {r.e2e_p99:.2f} |"
        for r in reports
    ]
    return f"### {title}\n\n{head}\n" + "\n".join(rows)


# --- one streamed chat request (llamacpp_compare, serve_vs_engine) ---------------------------------


@dataclass
class Streamed:
    """One streamed ``/v1/chat/completions`` request as the client saw it."""

    ttft_s: float  # from the request's send to the first chunk with non-empty content
    completion_tokens: int  # from the stream's usage chunk
    prompt_tokens: int
    text: str | None = None  # the generated content, when asked for (``collect_text``)
    logprobs: list[float] | None = None  # each generated token's logprob (``collect_text`` and ``logprobs``)


def parse_sse(line: bytes) -> dict | None:
    """The JSON object of one ``data:`` line of an OpenAI stream; None for other lines and [DONE]. An error
    line (``error: ...`` or ``data: {"error": ...}``) raises RuntimeError with it."""
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
    url: str,
    fields: dict,
    message: str,
    max_tokens: int,
    *,
    ignore_eos: bool = True,
    collect_text: bool = False,
    logprobs: bool = False,
    label: str = "",
) -> Streamed:
    """Stream one greedy chat completion of ``message`` from ``url`` (``http://host:port``), one connection
    per request; ``fields`` (``model`` and any server-specific ones) go into the body as they are.

    The load generator shares the CPU with the server it measures, so it is kept light: a raw asyncio
    protocol (``_SSEReader``) that only keeps the received bytes and notes the time of the first content
    chunk, and the stream parsed once it has ended (measured against an aiohttp client on the same load,
    32 streams x 64 tokens: ~14 vs ~34 us of client CPU per token). A content chunk is one holding
    ``"content":"`` with something after it (both servers write compact JSON). With ``collect_text`` the
    content is joined, and with ``logprobs`` too the request asks for them and each token's logprob is kept.
    """
    body = {
        **fields,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
        **({"logprobs": True} if logprobs else {}),
    }
    who = label or str(fields.get("model"))
    host, _, port = url.removeprefix("http://").partition(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    ended: asyncio.Future = loop.create_future()
    start = time.perf_counter()
    transport, reader = await loop.create_connection(
        lambda: _SSEReader(head + payload, start, ended), host, int(port or 80)
    )
    try:
        await ended
    finally:
        transport.close()
    status, lines = _http_lines(b"".join(reader.parts))
    if status != 200:
        raise RuntimeError(f"{who}: HTTP {status}: {b''.join(lines).decode(errors='replace')[:300]}")
    usage, text, lps = None, [], []
    for line in lines:
        if line.startswith((b"error:", b'data: {"error"')):
            parse_sse(line)  # raises with the server's message
        elif collect_text:
            data = parse_sse(line)
            if data is None:
                continue
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices") or []:
                if content := (choice.get("delta") or {}).get("content"):
                    text.append(content)
                lps += [t["logprob"] for t in (choice.get("logprobs") or {}).get("content") or []]
        elif b'"usage":{' in line:
            usage = parse_sse(line)["usage"]  # type: ignore[index]
    if reader.ttft is None or usage is None:
        raise RuntimeError(f"{who}: a stream ended without content or usage")
    return Streamed(
        reader.ttft,
        usage["completion_tokens"],
        usage["prompt_tokens"],
        "".join(text) if collect_text else None,
        lps if collect_text and logprobs else None,
    )


CONTENT = b'"content":"'


class _SSEReader(asyncio.Protocol):
    """Sends ``request`` and keeps every byte of the answer; ``ttft``: seconds from ``start`` to the first
    bytes holding non-empty content; ``ended`` is set when the server closes the connection."""

    def __init__(self, request: bytes, start: float, ended: asyncio.Future) -> None:
        self.request, self.start, self.ended = request, start, ended
        self.parts: list[bytes] = []
        self.ttft: float | None = None
        self._tail = b""  # the last bytes of the previous read: a marker may straddle two reads

    def connection_made(self, transport) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parts.append(data)
        if self.ttft is not None:
            return
        buf = self._tail + data
        i = buf.find(CONTENT)
        while i >= 0 and i + len(CONTENT) < len(buf):
            if buf[i + len(CONTENT)] != ord('"'):  # not an empty string
                self.ttft = time.perf_counter() - self.start
                return
            i = buf.find(CONTENT, i + len(CONTENT))
        # keep a marker that ends this read (its next byte is still to come) or a part of one
        self._tail = buf[i:] if i >= 0 else buf[-(len(CONTENT) - 1) :]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


def _http_lines(raw: bytes) -> tuple[int, list[bytes]]:
    """(status code, body lines) of a whole HTTP/1.1 response, chunked transfer encoding undone."""
    header, _, body = raw.partition(b"\r\n\r\n")
    status_line, *fields = header.split(b"\r\n")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if any(f.lower().replace(b" ", b"") == b"transfer-encoding:chunked" for f in fields):
        chunks, i = [], 0
        while (j := body.find(b"\r\n", i)) >= 0:
            size = int(body[i:j].split(b";")[0] or b"0", 16)
            if size == 0:
                break
            chunks.append(body[j + 2 : j + 2 + size])
            i = j + 2 + size + 2
        body = b"".join(chunks)
    return status, body.splitlines(keepends=True)


# --- launching servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGINT (a server drains and exits; py-spy writes its profile), then kill after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, paths: tuple[str, ...]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        for path in paths:
            try:
                if httpx.get(url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise SystemExit(f"server at {url} not healthy after {timeout:.0f} s")


def bench_adapters(model_dir: str, count: int, root: Path) -> dict[str, str]:
    """``count`` random PEFT adapters (ranks 8-64, mixed targets) for the model, cached under ``root``."""
    if count == 0:
        return {}
    sys.path.insert(0, str(HERE))
    from common import make_bench_adapters
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    paths = make_bench_adapters(model, root, count)
    return {f"adapter-{i:02d}": str(p) for i, p in enumerate(paths)}


def launch(args, model_dir: str, adapters: dict[str, str], log: Path) -> subprocess.Popen:
    port = free_port()
    args.base_url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.launch == "blora":
        cmd = [sys.executable, "-m", "blora.server", "--model", model_dir, "--served-model-name", args.model,
               "--port", str(port), "--dtype", args.dtype, "--max-queue", "-1", "--log-level", "warning"]  # fmt: skip
        if adapters:
            cmd += ["--lora-modules", *(f"{k}={v}" for k, v in adapters.items())]
        health = ("/health",)
    else:
        exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
        cmd = [exe, "serve", model_dir, "--port", str(port), "--dtype", args.dtype, "--device", "cpu"]
        if args.continuous_batching:
            cmd.append("--continuous-batching")
        args.model = model_dir
        health = ("/health", "/v1/models")
    print("launching:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_healthy(args.base_url, proc, args.startup_timeout, health)
    return proc


def warm_up(args, models: list[str]) -> None:
    """One short request per model, so adapters loaded on first use are resident before timing."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    start = time.perf_counter()
    for model in models:
        body = {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0.0}
        r = httpx.post(args.base_url + "/v1/completions", json=body, headers=headers, timeout=args.timeout)
        if r.status_code != 200:
            raise SystemExit(f"warm-up request to {model!r} failed: {r.status_code} {r.text[:300]}")
    print(f"warm-up: {len(models)} model(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launch", choices=["blora", "transformers"], help="start this server (else --base-url)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="base", help="base model id (the served name when launching blora)")
    p.add_argument("--model-dir", default=None, help="model to launch (default: the embedded SmolLM2)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--adapters", type=int, default=16, help="distinct adapters (0: base model only)")
    p.add_argument("--adapter-names", nargs="*", default=None, help="adapter ids of a running server")
    p.add_argument("--zipf", type=float, default=1.1, help="popularity exponent s: weight of rank i is 1/i^s")
    p.add_argument("--base-share", type=float, default=0.1, help="share of requests to the base model")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    p.add_argument("--num-requests", type=int, default=0, help="fixed request count per rate (overrides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--include-usage", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--continuous-batching", action="store_true", help="transformers serve --continuous-batching"
    )
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=None, help="write the reports here")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from blora.models import default_model_dir

    if args.launch == "transformers" and args.ignore_eos:
        print("transformers serve refuses ignore_eos (HTTP 422): sending none", file=sys.stderr)
        args.ignore_eos = False
    model_dir = args.model_dir or str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    proc, adapters = None, {}
    work = Path(tempfile.gettempdir()) / "blora-serve-load"
    work.mkdir(exist_ok=True)
    try:
        if args.launch == "blora":
            adapters = bench_adapters(model_dir, args.adapters, work / "adapters")
        if args.launch:
            proc = launch(args, model_dir, adapters, work / f"{args.launch}.log")
        names = args.adapter_names if args.adapter_names is not None else list(adapters)
        models, weights = zipf_models(args.model, names, args.zipf, args.base_share if names else 1.0)
        warm_up(args, models)
        reports = []
        for rate in args.rates:
            planned = plan(args, tokenizer, rate, models, weights)
            report = asyncio.run(run_rate(args, planned, rate))
            reports.append(report)
            print(json.dumps(asdict(report)), file=sys.stderr)
        server = args.launch or args.base_url
        if args.launch == "transformers" and args.continuous_batching:
            server += " (continuous batching)"
        eos = "ignore_eos" if args.ignore_eos else "stops at EOS"
        title = f"{server}: {len(names)} adapters (zipf s={args.zipf}), {args.dtype}, {eos}"
        print(table(title, reports))
        if args.json:
            args.json.write_text(
                json.dumps({"title": title, "reports": [asdict(r) for r in reports]}, indent=1)
            )
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
