"""Engine throughput: the blora engine vs PEFT vs transformers ``generate`` on one workload.

Workload (issue 3): SmolLM2-135M-Instruct, 32 chat requests of varied prompt length (35-64 tokens), 64 new
tokens each (EOS ignored), greedy, ``--threads`` torch threads, every system in the same dtype. Systems:
the engine base-only and with 16 distinct adapters (ranks 8-64, mixed target sets; benchmarks/common.py),
PEFT mixed batch (``generate(adapter_names=...)``), PEFT one adapter at a time, transformers ``generate``
base-only. Plus a sweep over the number of distinct adapters (1, 4, 16, 64; with 64 adapters the batch
has 64 requests so that all are distinct) for the engine and PEFT mixed, drawn as a PNG.

Each measurement runs in its own subprocess, one after the other: peak memory (VmHWM) is per system and
no system warms caches for another. Reported: generated tok/s, time to first token (mean over requests;
for static batches the first decode step of the batch), peak RSS.

Run: ``.venv/bin/python benchmarks/throughput.py [--dtypes bfloat16 float32] [--sweep 1 4 16 64]``
(``--quick`` for a smoke run). Results: bench_results/throughput.{json,md,png}. Each system is timed
``--runs`` times (after a warm-up) and the best run is reported, as other load on a shared machine only
ever slows a run down.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chat_prompts, make_bench_adapters  # noqa: E402

LABELS = {
    "transformers": "transformers generate, base-only",
    "engine": "blora engine, base-only",
    "engine-lora": "blora engine, {k} adapters",
    "peft-mixed": "PEFT mixed batch, {k} adapters",
    "peft-serial": "PEFT one adapter at a time, {k} adapters",
}


# -- one measurement (child process) -----------------------------------------------------------------


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def workload(tok, args) -> tuple[list[str], list[str | None]]:
    n = max(args.requests, args.k)
    texts = chat_prompts(tok, n)
    names = [None] * n if args.k == 0 else [f"bench-{i % args.k:03d}" for i in range(n)]
    return texts, names


def run_engine(loaded, args, paths) -> Callable[[], dict]:
    from blora.engine import LLM, SamplingParams

    texts, names = workload(loaded.tokenizer, args)
    adapters = {p.name: str(p) for p in paths[: args.k]}
    llm = LLM(loaded, adapters=adapters, max_loras=max(16, args.k), max_num_seqs=max(64, len(texts)))
    warm = list(dict.fromkeys(names))  # loads every adapter (they load on first use)
    llm.generate(["Hi"] * len(warm), SamplingParams(max_tokens=2, temperature=0), adapters=warm)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    def run() -> dict:
        start = time.time()
        outs = llm.generate(texts, params, adapters=names)
        seconds = time.time() - start
        ttft = [o.metrics.first_token_time - start for o in outs]
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
        return {"seconds": seconds, "ttft_s": sum(ttft) / len(ttft)}

    return run


class FirstToken:
    """Logits processor that notes when the first token's logits are ready (= the batch's TTFT)."""

    def __init__(self) -> None:
        self.time: float | None = None

    def __call__(self, input_ids, scores):
        if self.time is None:
            self.time = time.perf_counter()
        return scores


def static_generate(model, tok, texts, args, **kw) -> tuple[float, float]:
    """(seconds, seconds to first token) of one left-padded ``generate`` call."""
    from transformers import LogitsProcessorList

    from blora import prepare_batch

    batch = prepare_batch([(t, None) for t in texts], tok, model, {})
    batch.pop("adapter_ids")
    first = FirstToken()
    n = args.new_tokens
    start = time.perf_counter()
    out = model.generate(
        **batch,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        logits_processor=LogitsProcessorList([first]),
        **kw,
    )
    assert out.shape[1] == batch["input_ids"].shape[1] + n
    return time.perf_counter() - start, first.time - start


def run_transformers(loaded, args, paths) -> Callable[[], dict]:
    texts, _ = workload(loaded.tokenizer, args)
    static_generate(loaded.model, loaded.tokenizer, texts[:4], argparse.Namespace(new_tokens=2))

    def run() -> dict:
        seconds, ttft = static_generate(loaded.model, loaded.tokenizer, texts, args)
        return {"seconds": seconds, "ttft_s": ttft}

    return run


def peft_model(loaded, paths, k):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(paths[0]), adapter_name=paths[0].name)
    for p in paths[1:k]:
        model.load_adapter(str(p), adapter_name=p.name)
    return model.eval()


def run_peft_mixed(loaded, args, paths) -> Callable[[], dict]:
    texts, names = workload(loaded.tokenizer, args)
    model = peft_model(loaded, paths, args.k)
    tok = loaded.tokenizer
    static_generate(model, tok, texts[:4], argparse.Namespace(new_tokens=2), adapter_names=names[:4])

    def run() -> dict:
        seconds, ttft = static_generate(model, tok, texts, args, adapter_names=names)
        return {"seconds": seconds, "ttft_s": ttft}

    return run


def run_peft_serial(loaded, args, paths) -> Callable[[], dict]:
    texts, names = workload(loaded.tokenizer, args)
    model = peft_model(loaded, paths, args.k)
    tok = loaded.tokenizer
    static_generate(model, tok, texts[:2], argparse.Namespace(new_tokens=2))

    def run() -> dict:
        start, ttfts = time.perf_counter(), []
        for name in dict.fromkeys(names):
            group = [t for t, n in zip(texts, names, strict=True) if n == name]
            model.set_adapter(name)
            offset = time.perf_counter() - start
            _, ttft = static_generate(model, tok, group, args)
            ttfts += [offset + ttft] * len(group)
        return {"seconds": time.perf_counter() - start, "ttft_s": sum(ttfts) / len(ttfts)}

    return run


RUNNERS = {
    "transformers": run_transformers,
    "engine": run_engine,
    "engine-lora": run_engine,
    "peft-mixed": run_peft_mixed,
    "peft-serial": run_peft_serial,
}


def child(args) -> None:
    from blora.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(dtype=args.dtype)
    paths = sorted(Path(args.adapter_dir).glob("bench-*"))
    with torch.inference_mode():
        run = RUNNERS[args.system](loaded, args, paths)
        runs = [run() for _ in range(args.runs)]
    result = min(runs, key=lambda r: r["seconds"])  # best of --runs: the least disturbed by other load
    result["runs_s"] = [round(r["seconds"], 3) for r in runs]
    n = max(args.requests, args.k)
    result.update(
        system=args.system,
        label=LABELS[args.system].format(k=args.k),
        dtype=args.dtype,
        adapters=args.k,
        requests=n,
        new_tokens=args.new_tokens,
        tok_s=n * args.new_tokens / result["seconds"],
        peak_rss_mb=peak_rss_mb(),
        threads=args.threads,
    )
    print("RESULT " + json.dumps(result), flush=True)


# -- orchestration (parent process) --------------------------------------------------------------------


def measure(system: str, dtype: str, k: int, args, adapter_dir: Path) -> dict | None:
    cmd = [sys.executable, __file__, "--child", system, "--dtype", dtype, "--k", str(k)]
    cmd += [
        "--requests",
        str(args.requests),
        "--new-tokens",
        str(args.new_tokens),
        "--threads",
        str(args.threads),
    ]
    cmd += ["--adapter-dir", str(adapter_dir), "--runs", str(args.runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"  {dtype} {system} k={k} FAILED:\n{proc.stderr[-2000:]}", flush=True)
        return None
    row = json.loads(lines[-1][len("RESULT ") :])
    print(
        f"  {dtype:9s} {row['label']:42s} {row['tok_s']:7.1f} tok/s  TTFT {row['ttft_s']:6.2f} s  "
        f"peak {row['peak_rss_mb']:6.0f} MiB",
        flush=True,
    )
    return row


def prepare_adapters(dtype: str, root: Path, count: int) -> Path:
    from blora.models import load_model

    loaded = load_model(dtype=dtype)
    make_bench_adapters(loaded.model, root / dtype, count)
    return root / dtype


def plan(args) -> list[tuple[str, int]]:
    main_runs = [
        ("transformers", 0),
        ("engine", 0),
        ("engine-lora", 16),
        ("peft-mixed", 16),
        ("peft-serial", 16),
    ]
    sweep = [(s, k) for k in args.sweep for s in ("engine-lora", "peft-mixed") if (s, k) not in main_runs]
    return [r for r in main_runs + sweep if not (args.skip_peft and r[0].startswith("peft"))]


def table(rows: list[dict]) -> str:
    lines = [
        "| dtype | system | tok/s | vs transformers | vs engine base | vs PEFT mixed | TTFT (s) | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype]
        ref = {
            s: next((r["tok_s"] for r in sub if r["system"] == s and r["adapters"] in (0, 16)), None)
            for s in LABELS
        }
        for r in sub:
            ratios = [
                f"{r['tok_s'] / ref[s]:.2f}x" if ref[s] else "-"
                for s in ("transformers", "engine", "peft-mixed")
            ]
            lines.append(
                f"| {dtype} | {r['label']} | {r['tok_s']:.1f} | {' | '.join(ratios)} | {r['ttft_s']:.2f} | "
                f"{r['peak_rss_mb']:.0f} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for system, style in (("engine-lora", "o-"), ("peft-mixed", "s--")):
            pts = sorted(
                (r["adapters"], r["tok_s"]) for r in rows if r["dtype"] == dtype and r["system"] == system
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    style,
                    label=LABELS[system].format(k="k").replace(", k adapters", ""),
                )
        for system, style in (("engine", ":"), ("transformers", "-.")):
            base = [r["tok_s"] for r in rows if r["dtype"] == dtype and r["system"] == system]
            if base:
                ax.axhline(base[0], linestyle=style, color="gray", label=LABELS[system])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("generated tok/s")
        ax.set_title(f"SmolLM2-135M, {dtype}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--runs", type=int, default=2, help="timed runs per system; the best one is reported")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the whole plan, interleaved; keep the best"
    )
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--quick", action="store_true", help="8 requests x 8 tokens, sweep 1 4: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench_results/throughput"))
    parser.add_argument(
        "--adapter-cache", type=Path, default=Path(tempfile.gettempdir()) / "blora-bench-adapters"
    )
    parser.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.system = args.child
        child(args)
        return
    if args.quick:
        args.requests, args.new_tokens, args.sweep = 8, 8, [1, 4]
    rows = []
    for dtype in args.dtypes:
        adapter_dir = prepare_adapters(dtype, args.adapter_cache, max([16, *args.sweep]))
        best: dict[tuple[str, int], dict] = {}
        for _ in range(args.rounds):  # interleaved: a burst of outside load hits every system alike
            for system, k in plan(args):
                row = measure(system, dtype, k, args, adapter_dir)
                if row and ((system, k) not in best or row["tok_s"] > best[(system, k)]["tok_s"]):
                    best[(system, k)] = row
        rows += best.values()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    md = table(rows)
    args.out.with_suffix(".md").write_text(md + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
