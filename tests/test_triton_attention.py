"""Triton paged decode attention against its reference and the engine's PyTorch decode path, under Triton's
CPU interpreter (see ``tests/triton_interp.py``): GQA, sliding window, padded slot rows, three dtypes; and
the engine with ``attention_backend="triton"`` end to end: greedy outputs equal to the PyTorch path and PEFT."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.triton_interp import IN_CHILD, run_checks

if IN_CHILD:
    from peft import PeftModel

    from blora.engine import attention
    from blora.engine.attention import AttentionMetadata, _decode_torch
    from blora.engine.llm import build_engine
    from blora.engine.sampling_params import SamplingParams
    from blora.kernels.triton.attention import paged_decode_attention, paged_decode_attention_reference
    from tests.helpers import make_adapter, tiny_model, tokenizer

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def test_attention_kernel_under_interpreter():
    run_checks(__file__, timeout=600)


def test_attention_backend_choice():
    """Resolved once per engine: "auto" never picks triton without CUDA; bad choices name the field."""
    if IN_CHILD:
        pytest.skip("the interpreter makes triton available on CPU")
    from blora.engine import attention as attn

    cpu = torch.device("cpu")
    assert attn.select_backend("auto", cpu) == "cpu"
    assert attn.select_backend("auto", cpu, cpu_kernel=False) == "torch"
    assert attn.select_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="attention_backend='triton' needs a CUDA device"):
        attn.select_backend("triton", cpu)
    with pytest.raises(ValueError, match="attention_backend='cpu'.*cpu_kernel=False"):
        attn.select_backend("cpu", cpu, cpu_kernel=False)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        attn.select_backend("flash", cpu)


def _case(dtype, heads: int, kv_heads: int, head_dim: int, lens: list[int], seed: int = 0):
    """A paged cache with scattered slots per sequence, rows padded with the zeroed null slot."""
    g = torch.Generator().manual_seed(seed)
    num_slots = 160
    k = torch.randn(kv_heads, num_slots + 1, head_dim, generator=g).to(dtype)
    v = torch.randn(kv_heads, num_slots + 1, head_dim, generator=g).to(dtype)
    k[:, num_slots], v[:, num_slots] = 0, 0
    slots = torch.full((len(lens), max(lens)), num_slots, dtype=torch.long)
    for b, n in enumerate(lens):
        slots[b, :n] = torch.randperm(num_slots, generator=g)[:n]
    n_tokens = len(lens) + 2
    query = torch.randn(1, heads, n_tokens, head_dim, generator=g).to(dtype)
    rows = torch.tensor([0, *range(3, n_tokens)][: len(lens)])  # decode rows among prefill rows
    return query, rows, k, v, slots, torch.tensor(lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def check_decode_matches_reference_and_engine(dtype, window, heads, kv_heads):
    query, rows, k, v, slots, lens = _case(dtype, heads, kv_heads, 32, [1, 37, 70, 4])
    scale = 32**-0.5
    got = paged_decode_attention(query[0], rows, k, v, slots, lens, scale, window)
    want = paged_decode_attention_reference(query[0], rows, k, v, slots, lens, scale, window)
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 4)
    meta = AttentionMetadata(
        num_tokens=query.shape[2],
        slot_mapping=torch.zeros(query.shape[2], dtype=torch.long),
        decode_rows=rows,
        decode_slots=slots,
        decode_context_lens=lens,
    )
    engine = _decode_torch(query, k, v, meta, scale, window)
    torch.testing.assert_close(got.float(), engine.float(), rtol=tol, atol=tol * 4)


def check_window_skips_old_keys_and_odd_head_dim():
    """Keys before the window are never read: poisoning them with NaN changes nothing; D = 24 is masked."""
    query, rows, k, v, slots, lens = _case(torch.float32, 6, 2, 24, [40, 9])
    recent = {int(s) for b, n in enumerate(lens.tolist()) for s in slots[b, max(0, n - 8) : n]}
    old = [
        int(s) for b, n in enumerate(lens.tolist()) for s in slots[b, : max(0, n - 8)] if int(s) not in recent
    ]
    assert len(old) > 20
    k[:, old], v[:, old] = float("nan"), float("nan")
    got = paged_decode_attention(query[0], rows, k, v, slots, lens, 0.2, 8)
    want = paged_decode_attention_reference(query[0], rows, k, v, slots, lens, 0.2, 8)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _engine_outputs(model, attention_backend: str, prompts, adapters, dirs, max_tokens: int):
    engine = build_engine(
        model, tokenizer=tokenizer(), block_size=4, max_loras=4, lora_backend="torch", fast_path="off",
        attention_backend=attention_backend, max_num_batched_tokens=16,
    )  # fmt: skip
    assert engine.runner.attention_backend == attention_backend
    for name, path in dirs.items():
        engine.register_adapter(name, path)
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def check_engine_triton_attention_equals_torch_and_peft(tmp_path, monkeypatch, arch):
    """A tiny model (GQA) through the engine with decode attention forced to the Triton kernel: greedy
    tokens equal the PyTorch attention path's and PEFT's, and the kernel really ran."""
    calls = []
    kernel = attention._triton_decode()
    monkeypatch.setattr(attention, "_triton_decode", lambda: lambda *a: calls.append(1) or kernel(*a))
    base = tiny_model(arch)
    dirs = {
        "a0": make_adapter(base, tmp_path / "a0", seed=1, r=8),
        "a1": make_adapter(base, tmp_path / "a1", seed=2),
    }
    gen = torch.Generator().manual_seed(5)
    lens, adapters = [9, 3, 21, 6], ["a0", None, "a1", "a0"]
    prompts = [torch.randint(3, len(tokenizer()), (n,), generator=gen).tolist() for n in lens]
    got = _engine_outputs(tiny_model(arch), "triton", prompts, adapters, dirs, 6)
    assert calls  # decode steps went through the Triton kernel
    n_calls = len(calls)
    assert _engine_outputs(tiny_model(arch), "torch", prompts, adapters, dirs, 6) == got
    assert len(calls) == n_calls  # and the torch path did not
    for prompt, adapter, tokens in zip(prompts, adapters, got, strict=True):
        model = (
            base if adapter is None else PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[adapter]))
        )
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0
            )
        assert tokens == out[0, len(prompt) :].tolist(), (adapter, prompt)
