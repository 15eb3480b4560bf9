"""The benchmark workload: SmolLM2 chat prompts of varied length and PEFT adapters of ranks 8-64.

Shared by ``blora bench`` and the scripts in ``benchmarks/``. ``tiny_model`` writes a tiny random Llama
with the real SmolLM2 tokenizer, for a smoke run of the whole pipeline in seconds.
"""

from __future__ import annotations

import copy
import random
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
    """``n`` user prompts drawn from ``TEMPLATES`` x ``TOPICS`` (35-64 tokens once chat-templated)."""
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES).format(t=rng.choice(TOPICS)) for _ in range(n)]


def chat_prompts(tokenizer, n: int, seed: int = 0) -> list[str]:
    """``prompts`` rendered with the tokenizer's chat template (generation prompt added)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts(n, seed)
    ]


def make_bench_adapters(
    model, root: Path, count: int, shapes: list[tuple[int, int, list[str]]] = SHAPES
) -> list[Path]:
    """``count`` PEFT adapters (random non-zero A/B, small so outputs stay sane), cached on disk; adapter
    ``i`` takes its (rank, alpha, targets) from ``shapes[i % len(shapes)]``."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(count):
        path = root / f"bench-{i:03d}"
        paths.append(path)
        if (path / "adapter_model.safetensors").is_file():
            continue
        r, alpha, targets = shapes[i % len(shapes)]
        torch.manual_seed(1000 + i)
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(model), config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.002)
        peft_model.save_pretrained(str(path))
    return paths


def tiny_model(path: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the SmolLM2 tokenizer, saved once to ``path``."""
    if (path / "config.json").is_file():
        return path
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from blora.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
