"""Shared test fixtures: tiny random models of several families and PEFT adapters with non-zero B."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from blora.models import default_model_dir

ARCHS = ("llama", "mistral", "qwen2", "gpt2")


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The SmolLM2 tokenizer (real BPE, chat template), shared by all tiny models."""
    return AutoTokenizer.from_pretrained(str(default_model_dir()))


def tiny_config(arch: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common,
        )  # fmt: skip
    if arch == "mistral":
        return MistralConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=256, sliding_window=None, **common,
        )  # fmt: skip
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common,
        )  # fmt: skip
    if arch == "qwen3":  # q/k norms; head_dim 32 with hidden 64 and 4 heads (q_proj wider than hidden)
        return Qwen3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True, **common,
        )  # fmt: skip
    if arch == "phi3":  # fused qkv_proj / gate_up_proj in the checkpoint
        return Phi3Config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **common,
        )  # fmt: skip
    if arch == "gemma3":  # a sliding-window layer (window 8) then a full-attention one, each its own rotary
        return Gemma3TextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, **common,
        )  # fmt: skip
    if arch == "gemma2":  # attention logit soft-capping (small cap: it bites) and final logit soft-capping
        return Gemma2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0, max_position_embeddings=256, **common,
        )  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer())), dtype=dtype)
    if arch == "qwen2":  # make the q/k/v biases non-zero so they are exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    if arch in (
        "qwen3",
        "phi3",
        "gemma2",
        "gemma3",
    ):  # non-unit norm weights (q/k norms included) so they are exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(1, 0.3)
    return model.eval()


def save_tiny_model(arch: str, path: Path, seed: int = 0) -> Path:
    tiny_model(arch, seed).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


# Per-family module names for adapter targets.
ATTN = {"gpt2": ["c_attn"], "phi3": ["qkv_proj"], "default": ["q_proj", "v_proj"]}
MLP = {
    "gpt2": ["c_fc", "c_proj"],
    "phi3": ["gate_up_proj", "down_proj"],
    "default": ["gate_proj", "down_proj"],
}
ALL = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj"],
    "default": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
}


def targets(arch: str, kind: str) -> list[str]:
    table = {"attn": ATTN, "mlp": MLP, "all": ALL}[kind]
    return table.get(arch, table["default"])


def make_adapter(model: PreTrainedModel, path: Path, seed: int, **lora_kwargs) -> Path:
    """Save a PEFT adapter for ``model`` with random non-zero A and B (``init_lora_weights=False``)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    if type(model).__name__.startswith("GPT2"):
        lora_kwargs.setdefault("fan_in_fan_out", True)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**lora_kwargs))
    with torch.no_grad():  # larger B so that the adapter visibly changes the logits
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(str(path))
    return path


def peft_logits(model: PreTrainedModel, adapter: Path | None, input_ids, attention_mask=None) -> torch.Tensor:
    """Logits from PEFT running ``adapter`` alone (or the plain base model for None)."""
    import copy

    from peft import PeftModel

    with torch.no_grad():
        if adapter is None:
            return model(input_ids=input_ids, attention_mask=attention_mask).logits
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
        return peft_model(input_ids=input_ids, attention_mask=attention_mask).logits


def assert_greedy_equals_peft(
    outs, prompts: list[str], names: list[str | None], reference: PreTrainedModel, adapters: dict, tokens: int
) -> None:
    """Each engine output's greedy tokens equal ``generate`` of PEFT running its row's adapter alone on
    ``reference`` (``adapters``: name -> directory), or of ``reference`` itself for a base row (None)."""
    import copy

    from peft import PeftModel

    peft: dict[str, PreTrainedModel] = {}
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        ids = tokenizer()(prompt, return_tensors="pt").input_ids
        if name is not None and name not in peft:
            peft[name] = PeftModel.from_pretrained(copy.deepcopy(reference), str(adapters[name])).eval()
        model = reference if name is None else peft[name]
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == want[0, ids.shape[1] :].tolist(), (prompt, name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for test servers)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_each_step_both_ways(engine, adapters: dict[str, Path], requests: list[tuple[list[int], str | None]]):
    """Serve ``requests`` (prompt ids, adapter name or None; 6 greedy tokens each) on ``engine`` with every
    step run twice: through transformers' modules (the reference), then the engine's fast path. Returns each
    step's ``max |fast - reference| / max |reference|`` over the logits."""
    from blora.engine import SamplingParams

    runner = engine.runner
    execute = runner.execute
    worst: list[float] = []

    def both(scheduled):
        fast, runner.fast = runner.fast, None  # this step through transformers' modules first
        reference = execute(scheduled)
        runner.fast = fast
        steps = runner.fast_steps
        logits = execute(scheduled)
        assert runner.fast_steps == steps + 1
        worst.append((logits - reference).abs().max().item() / reference.abs().max().item())
        return logits

    runner.execute = both
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    for i, (prompt, name) in enumerate(requests):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=6, temperature=0.0), name)
    while engine.has_unfinished_requests():
        engine.step()
    return worst


def random_prompts(n: int, seed: int = 7) -> list[list[int]]:
    """``n`` (<= 6) prompts of random token ids of lengths 3, 40, 1, 17, 66, 9: a prefill across several
    chunks and blocks, single-token prompts, and ids anywhere in the tokenizer's vocabulary but the first 3."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 40, 1, 17, 66, 9][:n]
    return [torch.randint(3, len(tokenizer()), (k,), generator=gen).tolist() for k in lengths]


async def consume(engine, prompt, params, adapter=None, request_id=None):
    """One ``generate`` stream of an ``AsyncLLM`` or ``EngineProcess`` read to its end: (final output, text
    from the deltas, token ids from the deltas, number of outputs)."""
    text, ids, count, last = "", [], 0, None
    async for out in engine.generate(prompt, params, adapter=adapter, request_id=request_id):
        text += out.outputs[0].delta_text
        ids += out.outputs[0].delta_token_ids
        count += 1
        last = out
    return last, text, ids, count
