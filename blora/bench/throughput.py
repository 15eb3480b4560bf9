"""``blora bench``: engine vs transformers vs PEFT throughput on one workload; table, JSON and plot.

Workload: the embedded SmolLM2-135M-Instruct (or ``--model``), ``--requests`` chat requests of varied
prompt length (35-64 tokens), ``--max-tokens`` new tokens each (EOS ignored, so every system does the same
work), greedy, every system in the same dtype. Systems: transformers ``generate`` base-only, the engine
base-only and with ``--adapters`` distinct adapters (ranks 8-64, mixed target sets; ``workload.SHAPES``),
PEFT's mixed batch (``generate(adapter_names=...)``), and with ``--peft-serial`` PEFT one adapter at a
time; plus the engine and PEFT mixed at every ``--sweep`` count of distinct adapters, drawn as a PNG.

Each measurement runs in its own subprocess, one after the other, so peak memory (VmHWM) is per system
and no system warms caches for another; each is timed ``--runs`` times after a warm-up and the best run
is kept, as other load on a shared machine only ever slows a run down. ``--tiny`` runs the whole
pipeline on a tiny random Llama in seconds (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype", "--dtypes", nargs="+", default=None, help="one or more dtypes (default: bf16 where native)"
    )
    p.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    p.add_argument(
        "--max-tokens", "--new-tokens", type=int, default=64, help="new tokens per request, EOS ignored"
    )
    p.add_argument("--adapters", type=int, default=16, help="distinct adapters of the main rows (16)")
    p.add_argument("--sweep", type=int, nargs="*", default=[1, 4], help="more adapter counts to plot")
    p.add_argument("--runs", type=int, default=2, help="timed runs per system; the best one is kept")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole plan, interleaved; keep the best")
    p.add_argument("--threads", type=int, default=None, help="torch threads per system (default: torch's)")
    p.add_argument("--model", default=None, help="Llama-family HF dir or hub id (default: SmolLM2)")
    p.add_argument("--skip-peft", action="store_true", help="measure blora and transformers only")
    p.add_argument("--peft-serial", action="store_true", help="also PEFT one adapter at a time (slow)")
    p.add_argument("--quick", action="store_true", help="8 requests x 8 tokens, 4 adapters, 1 run")
    p.add_argument("--tiny", action="store_true", help="a tiny random model, 4 requests x 4 tokens")
    p.add_argument(
        "--out", type=Path, default=Path("bench_results/throughput"), help="writes OUT.json/.md/.png"
    )
    p.add_argument("--adapter-cache", type=Path, default=Path(tempfile.gettempdir()) / "blora-bench-adapters")


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(system, distinct adapters) in the order measured: the main rows, then the sweep."""
    n = args.adapters
    main_rows = [("transformers", 0), ("engine", 0), ("engine-lora", n), ("peft-mixed", n)]
    if args.peft_serial:
        main_rows.append(("peft-serial", n))
    sweep = [(s, k) for k in args.sweep for s in ("engine-lora", "peft-mixed") if (s, k) not in main_rows]
    return [r for r in main_rows + sweep if not (args.skip_peft and r[0].startswith("peft"))]


def measure(system: str, dtype: str, k: int, args, model: str | None, adapter_dir: Path) -> dict | None:
    """Run one system in a subprocess; its result row, or None (with its stderr printed) if it failed."""
    cmd = [sys.executable, "-m", "blora.bench.throughput", "--child", system, "--dtype", dtype]
    cmd += ["--k", str(k), "--requests", str(args.requests), "--new-tokens", str(args.max_tokens)]
    cmd += ["--threads", str(args.threads), "--adapter-dir", str(adapter_dir), "--runs", str(args.runs)]
    cmd += ["--model", model] if model else []
    cmd += ["--no-prefix-caching"] if getattr(args, "no_prefix_caching", False) else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"  {dtype} {system} k={k} FAILED:\n{proc.stderr[-2000:]}", flush=True)
        return None
    row = json.loads(lines[-1][len("RESULT ") :])
    print(
        f"  {dtype:9s} {row['label']:42s} {row['tok_s']:8.1f} tok/s  TTFT {row['ttft_s']:6.2f} s  "
        f"peak {row['peak_rss_mb']:6.0f} MiB",
        flush=True,
    )
    return row


def prepare_adapters(model: str | None, dtype: str, root: Path, count: int) -> Path:
    """The benchmark adapters for ``model`` in ``dtype`` (made once, cached under ``root``)."""
    from blora.bench.workload import make_bench_adapters
    from blora.models import load_model

    key = re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/")) if model else ""
    directory = root / key / dtype if key else root / dtype  # default model: the historical layout
    make_bench_adapters(load_model(model, dtype=dtype).model, directory, count)
    return directory


def _settle(args: argparse.Namespace) -> str | None:
    """Apply --quick / --tiny and the defaults that depend on this machine; returns the model to load."""
    import torch

    from blora.models.device import resolve_device, resolve_dtype

    if args.quick:
        args.requests, args.max_tokens, args.adapters, args.sweep, args.runs = 8, 8, 4, [1], 1
    if args.tiny:
        from blora.bench.workload import tiny_model

        args.requests, args.max_tokens, args.adapters, args.sweep, args.runs = 4, 4, 2, [], 1
        args.model = str(tiny_model(args.adapter_cache / "tiny-llama"))
    if args.dtype is None:
        args.dtype = [str(resolve_dtype(None, resolve_device("cpu"))).removeprefix("torch.")]
    args.threads = args.threads or torch.get_num_threads()
    return args.model


def run_bench(args: argparse.Namespace) -> list[dict]:
    """Measure every system of ``plan(args)`` per dtype; writes ``args.out``.json/.md/.png."""
    model = _settle(args)
    steps = plan(args)
    print(
        f"blora bench: {len(steps)} systems x {len(args.dtype)} dtype(s), each in its own process; "
        f"{args.requests} requests x {args.max_tokens} new tokens, greedy, {args.threads} threads, "
        f"model {model or 'SmolLM2-135M-Instruct'}",
        flush=True,
    )
    rows: list[dict] = []
    for dtype in args.dtype:
        adapter_dir = prepare_adapters(model, dtype, args.adapter_cache, max([args.adapters, *args.sweep]))
        best: dict[tuple[str, int], dict] = {}
        for _ in range(args.rounds):  # interleaved: a burst of outside load hits every system alike
            for system, k in steps:
                row = measure(system, dtype, k, args, model, adapter_dir)
                if row and ((system, k) not in best or row["tok_s"] > best[(system, k)]["tok_s"]):
                    best[(system, k)] = row
        rows += [best[s] for s in steps if s in best]
    write_results(rows, args)
    return rows


def bench_command(args: argparse.Namespace) -> int:
    """``blora bench``: 0 when every planned measurement produced a row, else 1."""
    rows = run_bench(args)
    missing = len(plan(args)) * len(args.dtype) - len(rows)
    if missing:
        print(f"{missing} measurement(s) failed (see above)")
    return 1 if missing else 0


def write_results(rows: list[dict], args: argparse.Namespace) -> None:
    """OUT.json (all fields), OUT.md (the table) and OUT.png (the plot, when matplotlib is installed)."""
    from blora.bench.report import plot, table

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    md = table(rows, args.adapters)
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md)
    title = "tiny random Llama" if args.tiny else Path(args.model).name if args.model else "SmolLM2-135M"
    drawn = rows and plot(rows, out.with_suffix(".png"), title=title)
    suffixes = (".json", ".md", ".png") if drawn else (".json", ".md")
    print(f"\nwrote {', '.join(str(out.with_suffix(s)) for s in suffixes)}")
    if rows and not drawn:
        print("no plot: matplotlib is not installed (pip install matplotlib)")


def _child_main(argv: list[str]) -> None:
    from blora.bench.systems import RUNNERS, child

    p = argparse.ArgumentParser(prog="blora.bench.throughput --child")
    p.add_argument("--child", dest="system", choices=sorted(RUNNERS), required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--k", type=int, default=0)
    p.add_argument("--requests", type=int, required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--adapter-dir", required=True)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--model", default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    child(p.parse_args(argv))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
