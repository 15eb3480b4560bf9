"""The engine's greedy outputs equal, token for token, each request run alone through transformers
``generate`` (base rows) or PEFT (adapter rows): mixed batches of many adapters, very different prompt
lengths, staggered arrivals, chunked prefill, a tight adapter cap and preemption under a tiny KV cache.

One tiny random float32 model per family; 9 PEFT adapters with non-zero B of mixed ranks and targets.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import MistralConfig, MistralForCausalLM

from blora import kernels
from blora.engine import LLM, SamplingParams
from blora.engine.llm import build_engine
from tests.helpers import ARCHS, make_adapter, targets, tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# (rank, lora_alpha, targets kind) of the adapters a0..a8
ADAPTERS = [(2, 4, "attn"), (8, 16, "mlp"), (4, 4, "all"), (16, 8, "attn"), (3, 6, "mlp"),
            (8, 8, "all-linear"), (1, 2, "all"), (6, 12, "attn"), (12, 24, "mlp")]  # fmt: skip
PROMPT_LENGTHS = [1, 37, 120, 5, 64, 2, 90, 17, 9, 150, 3, 44, 25, 70]
MAX_TOKENS = [6, 9, 4, 12, 7, 10, 5, 8, 11, 6, 9, 7, 12, 5]


def adapter_for(i: int) -> str | None:
    return None if i % 5 == 4 else f"a{i % len(ADAPTERS)}"


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    vocab = len(tokenizer())
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=(*ARCHS, "qwen3", "phi3", "gemma2", "gemma3"))
def family(request, tmp_path_factory):
    """(arch, adapter dirs, reference outputs per request) for one model family."""
    arch = request.param
    base = tiny_model(arch)
    root = tmp_path_factory.mktemp(f"adapters-{arch}")
    dirs = {}
    for i, (r, alpha, kind) in enumerate(ADAPTERS):
        target = "all-linear" if kind == "all-linear" else targets(arch, kind)
        dirs[f"a{i}"] = make_adapter(
            base, root / f"a{i}", seed=i, r=r, lora_alpha=alpha, target_modules=target
        )
    refs = [
        reference(base, dirs, p, adapter_for(i), m)
        for i, (p, m) in enumerate(zip(prompts(), MAX_TOKENS, strict=True))
    ]
    return arch, dirs, refs


def reference(base, dirs, prompt: list[int], adapter: str | None, max_tokens: int) -> list[int]:
    """Greedy tokens of the request alone: transformers ``generate`` (+ PEFT for an adapter)."""
    model = base if adapter is None else PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[adapter]))
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def run_staggered(engine, dirs) -> dict[str, list[int]]:
    """Requests arrive in three waves while earlier ones are running; returns tokens per request."""
    for name, path in dirs.items():
        engine.register_adapter(name, path)
    waves = [range(0, 5), range(5, 10), range(10, len(PROMPT_LENGTHS))]
    done: dict[str, list[int]] = {}
    for wave in waves:
        for i in wave:
            params = SamplingParams(max_tokens=MAX_TOKENS[i], temperature=0.0)
            engine.add_request(str(i), prompts()[i], params, adapter_for(i))
        for _ in range(3):
            collect(engine.step(), done)
    while engine.has_unfinished_requests():
        collect(engine.step(), done)
    return done


def collect(outputs, done) -> None:
    for out in outputs:
        if out.finished:
            assert out.outputs[0].finish_reason in ("stop", "length")
            done[out.request_id] = out.outputs[0].token_ids


def check(done, refs) -> None:
    for i, ref in enumerate(refs):
        assert done[str(i)] == ref, (
            f"request {i} (adapter {adapter_for(i)}, {PROMPT_LENGTHS[i]} prompt tokens)"
        )


@pytest.mark.parametrize("kernel", ["cpu_kernel", "torch_ops", "fast_path"])
def test_mixed_batch_matches_generate_and_peft(family, kernel, monkeypatch):
    """CPU: decode attention and LoRA through the compiled kernels (where they build), and through PyTorch;
    "fast_path": the engine's own family forward forced on (``fast_path="on"``, any CPU the kernels build for)."""
    arch, dirs, refs = family
    forced = kernel == "fast_path" and arch != "gpt2"
    if forced and kernels.get() is None:
        pytest.skip("the fast path needs the CPU kernels")
    engine = build_engine(
        tiny_model(arch),
        tokenizer=tokenizer(),
        max_num_batched_tokens=64,
        block_size=4,
        max_loras=4,
        cpu_kernel=kernel != "torch_ops",
        **({"fast_path": "on"} if forced else {}),
    )
    assert engine.runner.backend.name == (
        "torch" if kernel == "torch_ops" or kernels.get() is None else "cpu"
    )
    seen_adapters = []
    schedule = engine.scheduler.schedule

    def spy():
        plan = schedule()
        seen_adapters.append(plan.adapters)
        return plan

    engine.scheduler.schedule = spy
    check(run_staggered(engine, dirs), refs)
    assert max(len(a) for a in seen_adapters) <= 4
    native = kernel == "cpu_kernel" and kernels.get() is not None and kernels.get().native_vector
    if (
        native or forced
    ) and arch != "gpt2":  # Llama-family models ran the engine's own forward (blora.models.families)
        assert engine.runner.fast_steps > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preemption_does_not_change_outputs(family):
    arch, dirs, refs = family
    # 40 blocks x 4 = 160 tokens: the longest request (150 + 6) just fits, so others get preempted
    engine = build_engine(
        tiny_model(arch), tokenizer=tokenizer(), num_kv_blocks=40, block_size=4, max_num_batched_tokens=48
    )
    check(run_staggered(engine, dirs), refs)
    assert engine.num_preemptions_total > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("kernel", ["cpu_kernel", "torch_ops"])
def test_sliding_window_matches_generate(kernel):
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer()), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8,
    )  # fmt: skip
    model = MistralForCausalLM(config).eval()
    prompts_ = [p for p in prompts() if len(p) > 8][:4]
    llm = LLM(
        model,
        tokenizer=tokenizer(),
        block_size=4,
        max_num_batched_tokens=32,
        cpu_kernel=kernel == "cpu_kernel",
    )
    outs = llm.generate(prompts_, SamplingParams(max_tokens=12, temperature=0))
    model.config._attn_implementation = "sdpa"
    for prompt, out in zip(prompts_, outs, strict=True):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist()


def test_abort_frees_blocks_and_reports():
    engine = build_engine(tiny_model("llama"), tokenizer=tokenizer(), block_size=4)
    engine.add_request("a", prompts()[2], SamplingParams(max_tokens=50, temperature=0))
    engine.add_request("b", prompts()[1], SamplingParams(max_tokens=50, temperature=0))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    assert engine.abort_request("a")
    assert not engine.abort_request("a")
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "a"]
    assert aborted and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    assert engine.abort_request("b")
    engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_request_validation():
    engine = build_engine(tiny_model("llama"), tokenizer=tokenizer(), max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(None, [5] * 60, SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.add_request(None, "hello", SamplingParams(), adapter="nope")
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(None, [], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request(None, [10**9], SamplingParams())
    engine.add_request("x", "hello", SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", "hello", SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_engine(tiny_model("llama"), tokenizer=tokenizer(), max_model_len=10**6)


def test_one_set_of_engine_defaults():
    """``LLM``, ``AsyncLLM`` and ``blora serve`` take their defaults from ``EngineConfig`` (one place)."""
    import argparse
    import inspect

    from blora.engine import AsyncLLM
    from blora.engine.llm_engine import EngineConfig
    from blora.server.options import add_serve_arguments, engine_args

    shared = ("max_loras", "max_num_seqs", "max_num_batched_tokens", "block_size", "seed")
    for cls in (LLM, AsyncLLM):
        params = inspect.signature(cls.__init__).parameters
        for name in shared:
            assert params[name].default == getattr(EngineConfig, name), (cls.__name__, name)
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args([])
    kwargs = engine_args(args).kwargs()
    for name in (*shared[:3], "seed", "lora_backend", "fast_path", "cpu_kernel", "packed_weights"):
        assert kwargs[name] == getattr(EngineConfig, name), name
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(
        ["--fast-path", "on", "--no-cpu-kernel", "--lora-backend", "torch", "--no-packed-weights"]
    )
    kwargs = engine_args(args).kwargs()
    assert (kwargs["fast_path"], kwargs["cpu_kernel"], kwargs["lora_backend"], kwargs["packed_weights"]) == (
        "on",
        False,
        "torch",
        False,
    )
