"""Engine throughput of two checkouts of blora, alternated (for before/after figures on a drifting machine).

Each run is the child of ``blora bench`` (``python -m blora.bench.throughput --child engine|engine-lora``) in
its own process, with PYTHONPATH at one checkout; the order of the two checkouts flips every round and the
table gives medians. The adapters are made once with this checkout's code (PEFT format: the same files
for both).

    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/compare_checkouts.py /tmp/base . --dtype float32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SYSTEMS = (("engine", 0), ("engine-lora", 16))


def run_once(root: Path, system: str, k: int, args: argparse.Namespace, adapter_dir: Path) -> float | None:
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "blora.bench.throughput", "--child", system, "--dtype", args.dtype]
    cmd += ["--k", str(k), "--requests", str(args.requests), "--new-tokens", str(args.max_tokens)]
    cmd += ["--threads", str(args.threads), "--adapter-dir", str(adapter_dir), "--runs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"{root} {system} failed:\n{proc.stderr[-1500:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT ") :])["tok_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adapter-cache", type=Path, default=Path("/tmp/blora-bench-adapters"))
    args = p.parse_args()
    from blora.bench.throughput import prepare_adapters

    adapter_dir = prepare_adapters(None, args.dtype, args.adapter_cache, 16)
    roots = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for system, k in SYSTEMS:
            for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                tok_s = run_once(roots[name], system, k, args, adapter_dir)
                if tok_s is not None:
                    results.setdefault((system, name), []).append(tok_s)
                    print(f"round {r} {system:12s} {name:6s} {tok_s:7.1f} tok/s", flush=True)
    print(f"\n| {args.dtype} | before tok/s | after tok/s | after/before |\n|---|---|---|---|")
    for system, _ in SYSTEMS:
        b = statistics.median(results.get((system, "before"), [float("nan")]))
        a = statistics.median(results.get((system, "after"), [float("nan")]))
        print(f"| {system} | {b:.1f} | {a:.1f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
