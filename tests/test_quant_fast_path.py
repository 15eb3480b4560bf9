"""Quantized base models (``quantization="int8" | "int4"``) on a model family's own forward (``fast_path``).

The family forward runs q/k/v and gate/up as ONE quantized GEMM each (``fuse_quantized``: the parts' values
and scales side by side, not re-quantized) and o_proj / down_proj through their own ``QuantizedLinear``; the
same integer kernels as transformers' modules. Every engine step of a mixed batch (several adapters, base
rows) runs through both paths and must give the same logits; greedy tokens with adapters equal PEFT on the
dequantized model; layers that cannot be fused are refused in fast_path="on" and run by transformers'
modules in "auto".
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from blora import LLM, SamplingParams
from blora.engine.llm import build_engine
from blora.models import families
from blora.models.families import FastPathOptions
from blora.models.quant import (
    QuantizedLinear,
    dequantize_model,
    fuse_quantized,
    fused_extra_bytes,
    quantize_model,
)
from tests.helpers import (
    assert_greedy_equals_peft,
    make_adapter,
    random_prompts,
    run_each_step_both_ways,
    targets,
    tiny_model,
    tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread", "needs_kernels")

METHODS = ("int8", "int4")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rows", [(64, 32, 32), (128, 64, 64), (96, 64)])
def test_fused_layer_is_the_parts_side_by_side(method, rows):
    """Exact (the same kernel output as the parts' own calls, column for column); int8 parts become views of
    the fused buffers, int4 parts where their packed rows are whole blocks of the fused packing."""
    torch.manual_seed(0)
    parts = [QuantizedLinear.from_linear(nn.Linear(64, r, bias=i != 1), method) for i, r in enumerate(rows)]
    x = torch.randn(5, 64)
    want = torch.cat([p(x) for p in parts], dim=1)
    fused = fuse_quantized(parts)
    assert isinstance(fused, QuantizedLinear) and fused.out_features == sum(rows)
    assert torch.equal(fused(x), want)
    assert torch.equal(torch.cat([p(x) for p in parts], dim=1), want), "the parts still compute the same"
    shared = [
        p.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr() for p in parts
    ]
    if method == "int8":
        assert all(shared) and fused_extra_bytes(fused, parts) == 0
    else:  # the scales are copied; parts of whole 64-row blocks are views (all of them in (128, 64, 64))
        copies = sum(p.qweight.numel() for p, view in zip(parts, shared, strict=True) if not view)
        assert fused_extra_bytes(fused, parts) == fused.scales.numel() * 2 + copies
        assert all(shared) or rows != (128, 64, 64)
    assert fuse_quantized(parts[:1]) is parts[0], "one part is used as it is"


# mistral's k/v have 16 rows (one kv head of 16): int4 refuses those layers, int8 runs them
CASES = [(a, m) for a in ("llama", "qwen2", "phi3", "gemma3") for m in METHODS] + [("mistral", "int8")]


@pytest.mark.parametrize("arch,method", CASES)
def test_every_step_matches_transformers_modules(arch, method, tmp_path):
    """The fast decoder is built over the quantized layers and every step's logits (prefill chunks and
    decodes, three adapters and base rows) equal those of transformers' modules over the same
    ``QuantizedLinear`` layers (same kernels)."""
    model = tiny_model(arch)
    adapters = {
        "attn": make_adapter(model, tmp_path / "attn", seed=1, r=4, lora_alpha=8, target_modules=targets(arch, "attn")),
        "all": make_adapter(model, tmp_path / "all", seed=2, r=8, lora_alpha=8, target_modules=targets(arch, "all")),
    }  # fmt: skip
    engine = build_engine(
        model, tokenizer=tokenizer(), max_num_batched_tokens=48, block_size=4, max_loras=2, fast_path="on",
        quantization=method,
    )  # fmt: skip
    runner = engine.runner
    assert runner.fast is not None, "a quantized Llama-family model must get the fast path"
    gemm = runner.fast.layers[0].gemm
    assert all(isinstance(g.quant, QuantizedLinear) and g.quant.method == method for g in gemm.values())
    assert runner.fast.layers[0].packed == {}, "quantized GEMMs are not prepacked"
    names = ["attn", None, "all", "all"]
    worst = run_each_step_both_ways(engine, adapters, list(zip(random_prompts(4), names, strict=True)))
    # measured here: 0 on most steps, up to 4.8e-3 relative (phi3 int8). The kernels round their activations
    # to bfloat16: where the float32 norms / LoRA sums of the two paths differ in summation order, an
    # activation can round to the neighbouring bfloat16 value (a step of 2^-8 relative); the int8 LM head
    # rounds the final hidden state too, so a flip there moves the logits directly: a bound of two steps
    assert len(worst) > 6 and max(worst) < 2**-7, worst


@pytest.mark.parametrize("method", METHODS)
def test_greedy_tokens_equal_the_slow_path(method):
    """16 greedy tokens of the same quantized model, fast path on vs off (transformers' modules)."""
    prompts = random_prompts(3)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    outs = {}
    for mode in ("on", "off"):
        llm = LLM(tiny_model("llama"), tokenizer=tokenizer(), quantization=method, fast_path=mode)
        assert (llm.engine.runner.fast is not None) == (mode == "on")
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs["on"] == outs["off"]


@pytest.mark.parametrize("method", METHODS)
def test_engine_greedy_equals_peft_on_dequantized_model(tmp_path, method):
    base = tiny_model("llama")
    adapter = make_adapter(
        base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=targets("llama", "all")
    )
    reference = copy.deepcopy(base)
    quantize_model(reference, method)
    assert dequantize_model(reference) > 0
    llm = LLM(
        copy.deepcopy(base), tokenizer=tokenizer(), adapters={"a": str(adapter)}, quantization=method,
        fast_path="on",
    )  # fmt: skip
    assert llm.engine.runner.fast is not None
    prompts = ["Hello there", "The cat sat on", "Numbers: 1 2 3"]
    names = ["a", None, "a"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0), adapters=names)
    assert llm.engine.runner.fast_steps > 0
    assert_greedy_equals_peft(outs, prompts, names, reference, {"a": adapter}, 8)


def _mixed(kind: str) -> nn.Module:
    """A tiny int8 Llama whose layer 1 k_proj is int4 ("methods") or a float linear ("float")."""
    model = tiny_model("llama")
    quantize_model(model, "int8")
    attn = model.model.layers[1].self_attn
    linear = nn.Linear(attn.k_proj.in_features, attn.k_proj.out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(attn.k_proj.dequantize())
    attn.k_proj = QuantizedLinear.from_linear(linear, "int4") if kind == "methods" else linear
    return model


@pytest.mark.parametrize(
    "kind,reason",
    [
        (
            "methods",
            r"q_proj/k_proj/v_proj cannot run as one quantized GEMM: its parts differ in quantization",
        ),
        ("float", r"q_proj/k_proj/v_proj mix quantized and float linears"),
    ],
)
def test_unfusable_layers_are_refused_in_on_and_run_by_transformers_in_auto(kind, reason):
    with pytest.raises(ValueError, match=r"fast_path='on'.*" + reason):
        families.build(_mixed(kind), FastPathOptions(mode="on"))
    with pytest.raises(ValueError, match=reason):
        LLM(_mixed(kind), tokenizer=tokenizer(), fast_path="on")
    model = _mixed(kind)
    assert families.build(model, FastPathOptions(mode="auto")) is None
    llm = LLM(model, tokenizer=tokenizer(), fast_path="auto")
    assert llm.engine.runner.fast is None
    prompt = random_prompts(1)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0))[0].outputs[0].token_ids
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        want = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out == want[0, len(prompt) :].tolist()


@pytest.mark.parametrize("method", METHODS)
def test_int8_head_kernel_for_few_rows_packed_copy_above(method):
    """The fast forward's LM head: an int8 head runs its kernel up to ``HEAD_INT8_MAX_ROWS`` rows (the same
    call as the module) and a prepacked copy of its dequantized weight above; both are ``F.linear`` over
    the dequantized weight."""
    from blora.models.families.llama import HEAD_INT8_MAX_ROWS

    llm = LLM(tiny_model("llama"), tokenizer=tokenizer(), quantization=method, fast_path="on")
    fast = llm.engine.runner.fast
    head = llm.engine.model.get_output_embeddings()
    assert isinstance(head, QuantizedLinear) and head.method == "int8" and fast is not None
    assert fast.head is head and fast.head_packed is not None
    torch.manual_seed(0)
    for rows in (1, HEAD_INT8_MAX_ROWS, HEAD_INT8_MAX_ROWS + 1, 32):
        hidden = torch.randn(rows, head.in_features)
        with torch.no_grad():
            got, module = fast.logits(hidden), head(hidden)
            ref = nn.functional.linear(hidden, head.dequantize(torch.float32))
        assert got is not None and got.shape == (rows, head.out_features)
        if rows <= HEAD_INT8_MAX_ROWS:
            assert torch.equal(got, module), "few rows: the int8 kernel, as the module computes"
        assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()
