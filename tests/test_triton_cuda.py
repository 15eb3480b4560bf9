"""GPU checks (``pytest -m cuda``, run by ``benchmarks/gpu_check.py``; skipped without CUDA): the Triton
kernels against their reference ops at model-sized shapes, the Triton backend against the reference backend,
and the engine on the GPU against PEFT (greedy, token for token).

Nothing here needs the network or the embedded model: tiny models are built from configs with random
weights and a synthetic word-level tokenizer, so the checks run on a machine with only torch, triton,
transformers and peft (plus blora's own requirements).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)"),
]
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer ``<t0> .. <t{n-1}>`` (no files, no network): enough for the engine's detokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(vocab_size)}, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<t0>", bos_token="<t1>", eos_token="<t2>", pad_token="<t0>"
    )


def _lora_weights(dtype, in_f, outs, ranks, seed=0):
    from blora.kernels.triton.lora_weights import LoraWeights

    g = torch.Generator(device="cuda").manual_seed(seed)
    slices = []
    for out in outs:
        sl = {}
        for s, r in ranks.items():
            a = (torch.randn(r, in_f, generator=g, device="cuda") / in_f**0.5).to(dtype).t()
            sl[s] = (a, torch.randn(r, out, generator=g, device="cuda").to(dtype))
        slices.append(sl)
    return LoraWeights(slices, in_f, outs, "cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["sgmv", "bgmv"])
def test_lora_kernels_on_gpu(method, dtype):
    from blora.kernels.triton.lora import add_lora, add_lora_reference
    from blora.kernels.triton.lora_meta import LoraKernelMeta

    ranks = {s: (1, 8, 16, 33, 64)[s % 5] for s in range(40)}
    w = _lora_weights(dtype, 1024, (1024, 256, 256), ranks)  # q/k/v-shaped fused slices
    g = torch.Generator().manual_seed(1)
    slots = torch.randint(-1, 40, (300,), generator=g).tolist()
    if method == "sgmv":
        slots = sorted(slots)[:200] + [7] * 100  # long segments
    x = torch.randn(len(slots), 1024, device="cuda", dtype=dtype)
    y0 = torch.randn(len(slots), w.total_out, device="cuda", dtype=dtype)
    got, want = y0.clone(), y0.clone()
    add_lora(got, x, w, LoraKernelMeta.build(slots, "cuda"), method)
    torch.cuda.synchronize()
    add_lora_reference(want, x, w, slots)
    scale = (want.float() - y0.float()).abs().max().item()
    assert scale > 0.1
    assert (got.float() - want.float()).abs().max().item() <= TOL[dtype] * max(scale, 4.0)
    base = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(got[base], y0[base])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 100])
def test_decode_attention_on_gpu(dtype, window):
    from blora.kernels.triton.attention import paged_decode_attention, paged_decode_attention_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    heads, kv_heads, d, num_slots = 32, 8, 128, 8192  # Llama-3-8B heads
    k = torch.randn(kv_heads, num_slots + 1, d, generator=g, device="cuda").to(dtype)
    v = torch.randn(kv_heads, num_slots + 1, d, generator=g, device="cuda").to(dtype)
    lens = torch.tensor([1, 17, 300, 511, 64, 1000, 2, 129], device="cuda")
    slots = torch.full((8, 1000), num_slots, dtype=torch.long, device="cuda")
    for b, n in enumerate(lens.tolist()):
        slots[b, :n] = torch.randperm(num_slots, device="cuda")[:n]
    query = torch.randn(heads, 12, d, generator=g, device="cuda").to(dtype)
    rows = torch.tensor([0, 1, 2, 4, 5, 7, 9, 11], device="cuda")
    got = paged_decode_attention(query, rows, k, v, slots, lens, d**-0.5, window)
    want = paged_decode_attention_reference(query, rows, k, v, slots, lens, d**-0.5, window)
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype] * 4)


def test_triton_is_the_auto_backend_on_gpu():
    from blora.lora import backends

    assert backends.select("auto", backends.BackendOptions(torch.device("cuda"))).name == "triton"
    from blora.engine import attention

    assert attention.select_backend("auto", torch.device("cuda")) == "triton"


def _tiny_llama(vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _adapter(base, path, seed: int, r: int, targets):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft.save_pretrained(path)
    return path


@pytest.mark.parametrize("backend,attn", [("triton", "triton"), ("torch", "torch"), ("triton", "torch")])
def test_engine_on_gpu_matches_peft(tmp_path, backend, attn):
    """LoRA backend x decode attention (the Triton kernel over the paged cache, or gather + bmm)."""
    from peft import PeftModel

    from blora.engine.llm import build_engine
    from blora.engine.sampling_params import SamplingParams

    vocab = 1000
    base = _tiny_llama(vocab)
    specs = [(4, ["q_proj", "v_proj"]), (16, "all-linear"), (1, ["up_proj", "down_proj"]), (64, ["o_proj"])]
    dirs = {f"a{i}": _adapter(base, tmp_path / f"a{i}", i, r, t) for i, (r, t) in enumerate(specs)}
    gen = torch.Generator().manual_seed(3)
    reqs = [(n, [None, "a0", "a1", "a2", "a3"][i % 5]) for i, n in enumerate([5, 40, 3, 77, 12, 9, 130, 1])]
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n, _ in reqs]
    engine = build_engine(
        _tiny_llama(vocab).cuda(), tokenizer=synthetic_tokenizer(vocab), block_size=16, max_loras=4,
        lora_backend=backend, attention_backend=attn, max_num_batched_tokens=64,
    )  # fmt: skip
    assert engine.runner.backend.name == backend and engine.runner.attention_backend == attn
    for name, path in dirs.items():
        engine.register_adapter(name, path)
    for i, (prompt, (_, adapter)) in enumerate(zip(prompts, reqs, strict=True)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=12, temperature=0.0), adapter)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    for i, (prompt, (_, adapter)) in enumerate(zip(prompts, reqs, strict=True)):
        model = (
            base if adapter is None else PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[adapter]))
        )
        model = model.cuda()
        with torch.no_grad():
            ids = torch.tensor([prompt], device="cuda")
            out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert done[str(i)] == out[0, len(prompt) :].tolist(), (i, adapter)
