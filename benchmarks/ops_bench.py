"""Micro-benchmark of the batched LoRA ops on SmolLM2 layer shapes (decode: 32 tokens).

Prints microseconds per call (best of 3) for the base linear, each PyTorch op, the CPU kernel
(``blora/kernels``; what LoraLinear runs for decode on CPU) and what ``choose_method`` picks for the
PyTorch path, so the cost model in ``blora/lora/layers.py`` (``OP_COST``) can be checked on a new machine.
Weights stay in cache here (the same tensors every call); inside a model they come from memory, which makes
every op slower, the kernel ~1.5-2x (it is bound by reading the weights).
Run: ``.venv/bin/python benchmarks/ops_bench.py [--threads 2]``; other layer widths and prefill-sized
batches (the kernel's tiled path from 8 tokens per adapter): ``--widths 2048x8192 896x4864 --tokens 1536``.
"""

from __future__ import annotations

import argparse
import time

import torch

from blora import kernels
from blora.lora import ops
from blora.lora.backends.torch_ops import choose_method, grouped
from blora.lora.plan import LayerLoras, LoraPlan

MIXES = {
    "16 adapters r8-64": [8, 16, 32, 64] * 4,
    "8 adapters r8-64": [8, 16, 32, 64] * 2,
    "4 adapters r8-64": [8, 16, 32, 64],
    "4 adapters r16": [16] * 4,
    "16 adapters r8/16": [8, 16] * 8,
}


def best_us(fn, n: int = 30) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def bench(dtype: torch.dtype, in_f: int, out_f: int, ranks: list[int], tokens: int) -> dict[str, float]:
    u = len(ranks)
    x, y = torch.randn(tokens, in_f, dtype=dtype), torch.randn(tokens, out_f, dtype=dtype)
    pairs = [
        (torch.randn(in_f, r, dtype=dtype) * 0.01, torch.randn(r, out_f, dtype=dtype) * 0.01) for r in ranks
    ]
    groups = LoraPlan.from_tensor(torch.arange(tokens) % u)
    weight = torch.randn(out_f, in_f, dtype=dtype)
    plan = LayerLoras(groups.active, tuple(range(u)), pairs, in_f, out_f)
    exact = ops.build_rank_groups(list(range(u)), pairs, merge_below=0)
    stacked = ops.build_stacked(groups.active, pairs)
    kernel = kernels.get()
    timings = {}
    if kernel is not None:
        meta, flat = kernels.KernelTable.of(pairs, list(range(u))), groups.flat()
        timings["cpu_kernel"] = best_us(lambda: kernel.add(y, x, meta, *flat))
    return {
        "base": best_us(lambda: torch.nn.functional.linear(x, weight)),
        **timings,
        "segments": best_us(lambda: ops.add_segments(y, x, groups, pairs)),
        "grouped(exact ranks)": best_us(lambda: ops.add_grouped(y, x, groups, exact)),
        "grouped(auto merge)": best_us(lambda: ops.add_grouped(y, x, groups, grouped(plan))),
        "stacked": best_us(lambda: ops.add_stacked(y, x, groups, stacked)),
        "picked": choose_method(groups, plan),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--widths",
        nargs="+",
        default=["576x576", "576x1536"],
        help="INxOUT layer shapes (default: SmolLM2's)",
    )
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in w.split("x")) for w in args.widths]
    torch.set_num_threads(args.threads)
    for dtype in (torch.bfloat16, torch.float32):
        for in_f, out_f in shapes:
            for label, ranks in MIXES.items():
                res = bench(dtype, in_f, out_f, ranks, args.tokens)
                cells = "  ".join(
                    f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
                )
                print(f"{str(dtype)[6:]:8s} {in_f}x{out_f:<5d} {label:18s} {cells}", flush=True)


if __name__ == "__main__":
    main()
