"""Soak test of ``blora serve``: many short requests over the demo adapters, with adapter churn and client
aborts, while the server's memory, open files and KV-cache usage are sampled.

The script launches ``python -m blora.server`` (the embedded SmolLM2 and the four demo adapters, runtime
loading allowed under the demo adapter folder), then ``--concurrency`` clients send ``--requests``
requests: completions and chat, streamed and not, to the base model and every adapter (seeded, so
every run sends the same workload). Meanwhile:

- churn: every ``--churn-every`` requests one adapter is unloaded and loaded again under a fresh name
  (an unload refused because requests use the adapter is retried; requests that meet the gap get 404);
- aborts: ``--abort-share`` of the streams are closed after their first chunk, and as many non-streamed
  requests are cancelled after ``--abort-after`` seconds;
- samples every ``--sample-every`` requests: the server's RSS, open file descriptors and threads
  (psutil), KV-cache usage and running requests (``/metrics``).

The summary gives growth per 1,000 requests after ``--warmup`` requests (least-squares slope of RSS,
file descriptors and KV usage over the samples; the goal is flat) and every unexpected response.

    python benchmarks/soak.py                                  # 20,000 requests, results in /tmp
    python benchmarks/soak.py --requests 2000 --out soak.json  # a short run
    python benchmarks/soak.py --base-url http://127.0.0.1:8000 --pid 1234   # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
from serve_load import stop_server  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
BASE = "base"
TOPICS = (  # noqa: SIM905
    "the moon,bread,a volcano,the ocean,chess,bicycles,rain,music,bees,glaciers,trains,coffee,owls,"
    "rivers,mountains,libraries,markets,winter,bridges,deserts"
).split(",")
QUESTIONS = ("Tell me about {}.", "Why do people like {}?", "Write one line about {}.", "What is {}?")


@dataclass
class Sample:
    requests: int  # requests finished when the sample was taken
    elapsed_s: float
    rss_mb: float | None
    fds: int | None
    threads: int | None
    kv_usage: float | None
    running: float | None


@dataclass
class Tally:
    """Outcomes of the requests; ``unexpected`` keeps the first few bodies of each kind."""

    outcomes: Counter = field(default_factory=Counter)
    unexpected: dict[str, str] = field(default_factory=dict)
    churns: int = 0
    finished: int = 0

    def add(self, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        self.finished += 1
        if outcome.startswith("unexpected") and len(self.unexpected) < 20:
            self.unexpected.setdefault(outcome, detail[:500])


# --- the server -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, adapter_root: Path, log: Path) -> subprocess.Popen:
    """``python -m blora.server`` with the demo adapters; returns once ``/health`` answers."""
    from blora.demo.behaviours import ADAPTER_NAMES

    port = free_port()
    args.base_url = f"http://127.0.0.1:{port}"
    modules = [f"{name}={adapter_root / name}" for name in ADAPTER_NAMES]
    cmd = [sys.executable, "-m", "blora.server", "--served-model-name", BASE, "--port", str(port),
           "--lora-modules", *modules, "--adapter-root", str(adapter_root), "--allow-runtime-adapters",
           "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning", *args.server_args]  # fmt: skip
    print("launching:", " ".join(cmd), file=sys.stderr)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}; log: {log}")
        try:
            if httpx.get(args.base_url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not healthy after {args.startup_timeout:.0f} s; log: {log}")


# --- the load ---------------------------------------------------------------------------------------


@dataclass
class Soak:
    """Shared state of one run: the served adapter names (churn renames them) and the outcomes."""

    args: argparse.Namespace
    client: httpx.AsyncClient
    names: dict[str, str]  # demo adapter -> the name it is served under now
    retired: set[str] = field(default_factory=set)  # names unloaded by the churn
    tally: Tally = field(default_factory=Tally)
    samples: list[Sample] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def request_body(self, rng: random.Random) -> tuple[str, dict, bool]:
        """(path, body, stream) of one request: a random model, endpoint, prompt and streaming choice."""
        model = rng.choice([BASE, *self.names.values()])
        question = rng.choice(QUESTIONS).format(rng.choice(TOPICS))
        body: dict = {"model": model, "max_tokens": self.args.max_tokens, "temperature": rng.choice([0, 0.8])}
        stream = rng.random() < 0.5
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if rng.random() < 0.5:
            body["messages"] = [{"role": "user", "content": question}]
            return "/v1/chat/completions", body, stream
        body["prompt"] = question
        return "/v1/completions", body, stream


async def one_request(soak: Soak, rng: random.Random) -> None:
    path, body, stream = soak.request_body(rng)
    abort = rng.random() < soak.args.abort_share
    try:
        if stream:
            outcome, detail = await streamed(soak, path, body, abort)
        elif abort:
            outcome, detail = await cancelled(soak, path, body)
        else:
            r = await soak.client.post(path, json=body)
            outcome, detail = classify(soak, r.status_code, r.text, body["model"])
    except httpx.HTTPError as exc:
        outcome, detail = f"unexpected_transport_{type(exc).__name__}", repr(exc)
    soak.tally.add(outcome, detail)


async def streamed(soak: Soak, path: str, body: dict, abort: bool) -> tuple[str, str]:
    async with soak.client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return classify(soak, r.status_code, r.text, body["model"])
        async for line in r.aiter_lines():
            if abort and line.startswith("data: "):
                return "aborted_stream", ""  # leaving the block closes the connection mid-stream
            if line.startswith("data: ") and '"error"' in line[:20]:
                return "unexpected_sse_error", line
    return "ok", ""


async def cancelled(soak: Soak, path: str, body: dict) -> tuple[str, str]:
    try:
        r = await asyncio.wait_for(soak.client.post(path, json=body), soak.args.abort_after)
    except TimeoutError:
        return "aborted_request", ""
    return classify(soak, r.status_code, r.text, body["model"])


def classify(soak: Soak, status: int, text: str, model: str) -> tuple[str, str]:
    """``ok``; ``churn_404`` for an adapter the churn unloaded meanwhile; anything else is unexpected."""
    if status == 200:
        return "ok", ""
    if status == 404 and model in soak.retired:
        return "churn_404", ""
    return f"unexpected_{status}", text


async def worker(soak: Soak, counter: itertools.count, seed: int) -> None:
    rng = random.Random(seed)
    while next(counter) < soak.args.requests:
        await one_request(soak, rng)


# --- churn and sampling -------------------------------------------------------------------------------


async def churn(soak: Soak) -> None:
    """Every ``--churn-every`` requests: take one adapter out of the rotation, unload it once its requests in
    flight have finished (requests that still name it get 404), load it again under a fresh name."""
    demo = list(soak.names)
    for k in itertools.count(1):
        while soak.tally.finished < k * soak.args.churn_every:
            await asyncio.sleep(0.05)
        behaviour = demo[k % len(demo)]
        old = soak.names.pop(behaviour)
        soak.retired.add(old)  # a 404 for it is expected from the moment its unload starts
        if not await unload(soak, old):
            return
        r = await soak.client.post(
            "/v1/load_lora_adapter", json={"lora_name": f"{behaviour}-{k}", "lora_path": behaviour}
        )
        if r.status_code != 200:
            soak.tally.unexpected.setdefault(f"load_{r.status_code}", r.text[:500])
            return
        soak.names[behaviour] = f"{behaviour}-{k}"
        soak.tally.churns += 1


async def unload(soak: Soak, name: str, patience_s: float = 60.0) -> bool:
    """Unload ``name``, retrying while requests in flight still use it."""
    deadline = time.monotonic() + patience_s
    while True:
        r = await soak.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code == 200:
            return True
        in_use = "in flight" in r.text or "unfinished" in r.text
        if not in_use or time.monotonic() > deadline:
            soak.tally.unexpected.setdefault(f"unload_{r.status_code}", r.text[:500])
            return False
        await asyncio.sleep(0.05)


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def sample(soak: Soak, proc: psutil.Process | None) -> Sample:
    text = (await soak.client.get("/metrics")).text
    mem = fds = threads = None
    if proc is not None:
        mem, fds, threads = proc.memory_info().rss / 2**20, proc.num_fds(), proc.num_threads()
    return Sample(
        requests=soak.tally.finished,
        elapsed_s=round(time.monotonic() - soak.started, 2),
        rss_mb=None if mem is None else round(mem, 1),
        fds=fds,
        threads=threads,
        kv_usage=metric(text, "blora:kv_cache_usage_perc"),
        running=metric(text, "blora:num_requests_running"),
    )


async def sampler(soak: Soak, proc: psutil.Process | None) -> None:
    soak.samples.append(await sample(soak, proc))
    for k in itertools.count(1):
        while soak.tally.finished < k * soak.args.sample_every:
            await asyncio.sleep(0.05)
        soak.samples.append(s := await sample(soak, proc))
        print(row(s), file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, proc: psutil.Process | None) -> Soak:
    from blora.demo.behaviours import ADAPTER_NAMES

    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout, limits=limits) as client:
        soak = Soak(args, client, {name: name for name in ADAPTER_NAMES})
        background = [asyncio.create_task(sampler(soak, proc))]
        if args.churn_every > 0:
            background.append(asyncio.create_task(churn(soak)))
        counter = itertools.count()
        await asyncio.gather(*(worker(soak, counter, args.seed * 1000 + i) for i in range(args.concurrency)))
        for task in background:
            task.cancel()
        await asyncio.sleep(args.settle)  # aborted requests leave the engine; KV usage must return to 0
        soak.samples.append(s := await sample(soak, proc))
        print(row(s) + "  (after the load)", file=sys.stderr)
    return soak


# --- the summary --------------------------------------------------------------------------------------


def slope_per_1000(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs, times 1,000."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return None if var == 0 else 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def growth(samples: list[Sample], warmup: int) -> dict[str, float | None]:
    """Growth per 1,000 requests of each sampled quantity over the samples after the warm-up."""
    after = [s for s in samples[:-1] if s.requests >= warmup]  # the last sample is taken after the load
    out: dict[str, float | None] = {}
    for key in ("rss_mb", "fds", "threads", "kv_usage"):
        points = [(s.requests, getattr(s, key)) for s in after if getattr(s, key) is not None]
        slope = slope_per_1000([float(x) for x, _ in points], [float(y) for _, y in points])
        out[f"{key}_per_1000"] = None if slope is None else round(slope, 4)
    return out


def row(s: Sample) -> str:
    def fmt(v: object, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    return (
        f"{s.requests:>7} {s.elapsed_s:>8.1f} {fmt(s.rss_mb, '>8.1f')} {fmt(s.fds, '>5')} "
        f"{fmt(s.threads, '>5')} {fmt(s.kv_usage, '>6.3f')} {fmt(s.running, '>5')}"
    )


def summary(soak: Soak, warmup: int) -> dict:
    samples, tally = soak.samples, soak.tally
    during = samples[-2] if len(samples) > 1 else samples[-1]
    return {
        "requests": tally.finished,
        "seconds": during.elapsed_s,
        "requests_per_s": round(tally.finished / max(during.elapsed_s, 1e-9), 2),
        "outcomes": dict(tally.outcomes),
        "adapter_churns": tally.churns,
        "warmup_requests": warmup,
        "growth_after_warmup": growth(samples, warmup),
        "rss_mb_first_warm_last": [
            samples[0].rss_mb,
            next((s.rss_mb for s in samples if s.requests >= warmup), None),
            samples[-1].rss_mb,
        ],  # fmt: skip
        "kv_usage_after_load": samples[-1].kv_usage,
        "unexpected": tally.unexpected,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=16, help="clients sending requests at once")
    p.add_argument("--max-tokens", type=int, default=6, help="tokens generated per request")
    p.add_argument("--warmup", type=int, default=None, help="requests before growth is measured (10%%)")
    p.add_argument("--sample-every", type=int, default=250, help="requests between samples")
    p.add_argument("--churn-every", type=int, default=200, help="requests between adapter swaps (0: none)")
    p.add_argument("--abort-share", type=float, default=0.05, help="streams/requests the client abandons")
    p.add_argument("--abort-after", type=float, default=0.05, help="seconds before a request is cancelled")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="the server's OMP_NUM_THREADS (default: unset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle", type=float, default=3.0, help="seconds of idle before the last sample")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--base-url", default=None, help="an already running server (with the demo adapters)")
    p.add_argument("--pid", type=int, default=None, help="its process id, for RSS and file descriptors")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="extra `blora serve` options")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "blora-soak.json")
    args = p.parse_args()
    warmup = args.warmup if args.warmup is not None else args.requests // 10

    from blora.demo.behaviours import ADAPTERS_DIR

    server = None
    try:
        if args.base_url is None:
            server = launch(args, ADAPTERS_DIR, Path(tempfile.gettempdir()) / "blora-soak-server.log")
        pid = server.pid if server is not None else args.pid
        proc = psutil.Process(pid) if pid else None
        print(
            f"{'reqs':>7} {'time s':>8} {'RSS MB':>8} {'fds':>5} {'thr':>5} {'KV':>6} {'run':>5}",
            file=sys.stderr,
        )
        soak = asyncio.run(run(args, proc))
    finally:
        if server is not None:
            stop_server(server)
    result = summary(soak, warmup)
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps({**result, "samples": [asdict(s) for s in soak.samples]}, indent=1))
    print(f"written: {args.out}", file=sys.stderr)
    bad = sum(n for k, n in result["outcomes"].items() if k.startswith("unexpected"))
    sys.exit(1 if bad or result["unexpected"] else 0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
