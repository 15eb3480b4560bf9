"""Shared benchmark workload: SmolLM2 prompts of varied length and PEFT adapters of ranks 8-64."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

TOPICS = [
    "the moon", "bread", "volcanoes", "the ocean", "chess", "bicycles", "rain", "music", "honey bees",
    "glaciers", "the internet", "trains", "coffee", "paper", "deserts", "owls",
]  # fmt: skip
TEMPLATES = [
    "Tell me about {t}.",
    "Write a short poem about {t}.",
    "Explain to a child how {t} works, step by step, with an example and a fun fact at the end.",
    "What are three surprising facts about {t}? Answer briefly.",
    "Describe {t} in the style of a travel guide, mentioning history, culture and what a visitor should "
    "see first, then give two practical tips for someone on a small budget.",
]
# (rank, alpha, targets) cycled over the benchmark adapters: ranks 8-64, mixed target sets.
SHAPES = [
    (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    (16, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (32, 64, ["gate_proj", "up_proj", "down_proj"]),
    (64, 32, ["q_proj", "v_proj"]),
]


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES).format(t=rng.choice(TOPICS)) for _ in range(n)]


def chat_prompts(tokenizer, n: int, seed: int = 0) -> list[str]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts(n, seed)
    ]


def make_bench_adapters(model, root: Path, count: int) -> list[Path]:
    """``count`` PEFT adapters (random non-zero A/B, small so outputs stay sane), cached on disk."""
    import copy

    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(count):
        path = root / f"bench-{i:03d}"
        paths.append(path)
        if (path / "adapter_model.safetensors").is_file():
            continue
        r, alpha, targets = SHAPES[i % len(SHAPES)]
        torch.manual_seed(1000 + i)
        peft_model = get_peft_model(
            copy.deepcopy(model), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        )
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.002)
        peft_model.save_pretrained(str(path))
    return paths


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times
