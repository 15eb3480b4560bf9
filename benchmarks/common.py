"""Shared benchmark workload: SmolLM2 prompts of varied length and PEFT adapters of ranks 8-64.

The workload itself lives in the package (``blora.bench.workload``, also used by ``blora bench``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from blora.bench.workload import SHAPES, TEMPLATES, TOPICS, chat_prompts, make_bench_adapters, prompts

__all__ = ["SHAPES", "TEMPLATES", "TOPICS", "chat_prompts", "make_bench_adapters", "median_time", "prompts"]


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times
