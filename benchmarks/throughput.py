"""Engine throughput: the blora engine vs PEFT vs transformers ``generate`` (the README's figures).

A thin wrapper over ``blora bench`` (``blora/bench/``, one implementation) with the README's full plan:
bf16 and fp32, 2 threads, 32 chat requests x 64 new tokens, the engine base-only and with 16 adapters,
PEFT mixed batch and PEFT one adapter at a time, and a sweep over 1, 4, 16 and 64 distinct adapters (64
adapters with 64 requests). Any ``blora bench`` option after it overrides these, e.g.
``.venv/bin/python benchmarks/throughput.py --dtype bfloat16 --rounds 2``. Results:
bench_results/throughput.{json,md,png}.
"""

from __future__ import annotations

import sys

from blora.cli import main

FULL_PLAN = [
    "--dtype",
    "bfloat16",
    "float32",
    "--threads",
    "2",
    "--sweep",
    "1",
    "4",
    "16",
    "64",
    "--peft-serial",
]

if __name__ == "__main__":
    sys.exit(main(["bench", *FULL_PLAN, *sys.argv[1:]]))
