"""Load numbers others can compare: GuideLLM (vLLM's benchmarking tool) against ``blora serve``, offline.

Launches ``blora serve`` on a local model (default: the embedded SmolLM2-135M-Instruct) with ``--adapters N``
random PEFT adapters (the ones ``serve_load.py`` uses), then runs ``guidellm run`` once per target model
(``--models``: the base model and/or adapter ids) with a concurrent profile over ``--streams``, synthetic
prompts of ``--prompt-tokens`` and outputs of exactly ``--output-tokens`` (GuideLLM sends ``ignore_eos``), the
local tokenizer, and streamed ``/v1/completions``. Prints one table row per (model, streams): requests/s,
output tok/s, TTFT p50/p99, inter-token latency p50/p99, request latency p50, errors. The same command
against a vLLM server (``--base-url``) gives numbers to compare.

GuideLLM is a benchmark-only dependency, not in requirements.lock. Install it next to blora's torch (its
pins would otherwise replace click and multidict, and its dependencies include torch):

    pip install --no-deps guidellm==0.8.1 culsans==0.10.0 aiologic==0.17.1 datasets==5.2.0 dill==0.4.1 \\
        multiprocess==0.70.19 xxhash==4.1.0 pyarrow==26.0.1 pandas==3.1.1 Faker==40.63.0 ftfy==6.3.1 \\
        wcwidth==0.9.4 loguru==0.7.3 sanic==25.12.1 sanic-routing==23.12.0 tracerite==2.6.5 \\
        html5tagger==2.0.0 aiofiles==25.1.0 pydantic-settings==2.16.3 tabulate==0.10.0 \\
        eval_type_backport==0.4.0 more-itertools==11.2.1 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0 ujson==6.1.0

    # base model and one adapter, 1/4/16 concurrent streams, 32 requests each
    python benchmarks/guidellm_bench.py --adapters 4 --models base adapter-00 --streams 1 4 16
    # an already running server (blora or vLLM) with its model id and a local tokenizer directory
    python benchmarks/guidellm_bench.py --base-url http://127.0.0.1:8000 --models my-model --tokenizer DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from serve_load import bench_adapters, free_port, wait_healthy, warm_up  # noqa: E402


def guidellm_executable() -> str:
    exe = shutil.which("guidellm") or str(Path(sys.executable).parent / "guidellm")
    if not Path(exe).is_file():
        raise SystemExit("guidellm is not installed; see the install command at the top of this file")
    return exe


def launch(args, model_dir: str, adapters: dict[str, str], log: Path) -> subprocess.Popen:
    port = free_port()
    args.base_url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "blora.cli", "serve", model_dir, "--served-model-name", "base",
           "--port", str(port), "--dtype", args.dtype, "--max-queue", "-1", "--log-level", "warning",
           "--threads", str(args.threads)]  # fmt: skip
    if adapters:
        cmd += ["--lora-modules", *(f"{k}={v}" for k, v in adapters.items())]
    print("launching:", " ".join(cmd), file=sys.stderr)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_healthy(args.base_url, proc, args.startup_timeout, ("/health",))
    return proc


def run_guidellm(args, model: str, tokenizer_dir: str, out: Path) -> dict:
    """One ``guidellm run`` (all stream counts) against ``model``; its JSON report."""
    backend = f"kind=openai_http,target={args.base_url},model={model},request_format=/v1/completions"
    if args.api_key:
        backend += f",api_key={args.api_key}"
    cmd = [
        guidellm_executable(), "run",
        "--backend", backend,
        "--profile", json.dumps({"kind": "concurrent", "streams": args.streams}),
        "--constraint", f"kind=max_requests,count={args.requests}",
        "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
        "--tokenizer", f"kind=huggingface_auto,model={tokenizer_dir}",
        "--seed", f"kind=static,value={args.seed}",
        "--output", f"kind=json,path={out}",
        "--disable-console-interactive",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    print("running:", " ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, env=env, capture_output=not args.verbose, text=True)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(
            f"guidellm failed ({done.returncode}):\n{(done.stdout or '')[-3000:]}{done.stderr or ''}"
        )
    return json.loads(out.read_text())


def rows(report: dict, model: str) -> list[dict]:
    """One row per benchmark (stream count) of a GuideLLM report."""
    out = []
    for bench in report["benchmarks"]:
        m = bench["metrics"]

        def stat(name: str, key: str, scale: float = 1.0, m=m) -> float:
            s = m[name]["successful"]
            value = s["percentiles"][key] if key.startswith("p") else s[key]
            return round(value * scale, 2)

        totals = m["request_totals"]
        out.append(
            {
                "model": model,
                "streams": bench["config"]["strategy"].get("streams"),
                "requests": totals["successful"],
                "errors": totals["errored"] + totals["incomplete"],
                "req_per_s": stat("requests_per_second", "mean"),
                "output_tok_per_s": stat("output_tokens_per_second", "mean"),
                "ttft_p50_ms": stat("time_to_first_token_ms", "p50"),
                "ttft_p99_ms": stat("time_to_first_token_ms", "p99"),
                "itl_p50_ms": stat("inter_token_latency_ms", "p50"),
                "itl_p99_ms": stat("inter_token_latency_ms", "p99"),
                "latency_p50_s": stat("request_latency", "p50"),
            }
        )
    return out


def table(results: list[dict], title: str) -> str:
    head = ("model", "streams", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
            "e2e p50 s", "ok", "errors")  # fmt: skip
    keys = ("model", "streams", "req_per_s", "output_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
            "itl_p99_ms", "latency_p50_s", "requests", "errors")  # fmt: skip
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--base-url", default=None, help="an already running server (else blora serve is launched)"
    )
    p.add_argument("--model-dir", default=None, help="model to launch (default: the embedded SmolLM2)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: --model-dir)")
    p.add_argument("--adapters", type=int, default=4, help="random adapters to launch with (adapter-00, ...)")
    p.add_argument("--models", nargs="+", default=["base"], help="model ids to benchmark, one run each")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16], help="concurrent streams")
    p.add_argument("--requests", type=int, default=32, help="requests per stream count")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--verbose", action="store_true", help="show GuideLLM's own console output")
    args = p.parse_args()
    args.timeout = 600.0

    from blora.models import default_model_dir

    model_dir = args.model_dir or str(default_model_dir())
    tokenizer_dir = args.tokenizer or model_dir
    work = Path(tempfile.mkdtemp(prefix="blora-guidellm-"))
    proc = None
    try:
        if args.base_url is None:
            key = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[
                :12
            ]  # adapters per model
            adapters = bench_adapters(
                model_dir, args.adapters, Path(tempfile.gettempdir()) / "blora-guidellm" / key
            )
            proc = launch(args, model_dir, adapters, work / "server.log")
        warm_up(args, args.models)
        results = []
        for model in args.models:
            started = time.perf_counter()
            report = run_guidellm(args, model, tokenizer_dir, work / f"{model.replace('/', '_')}.json")
            results += rows(report, model)
            print(f"{model}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        server = "blora serve" if proc else args.base_url
        title = (f"GuideLLM against {server}: {args.prompt_tokens} prompt + {args.output_tokens} output tokens, "
                 f"{args.requests} requests per stream count, {args.dtype}")  # fmt: skip
        print(table(results, title))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
