"""Quantized base models (``quantization="int8" | "int4"``) with LoRA adapters on top.

The rulebook: a quantized layer computes ``F.linear(x, dequantize(W))`` up to the kernel's bfloat16
activations; the model's logits stay within a stated tolerance of the unquantized model's; a LoRA
adapter's term is the same A/B math as on the unquantized model (the adapters are never quantized); and
the engine's greedy tokens equal PEFT's on the dequantized model. Shapes the kernels cannot take are refused
before anything changes, naming the layer. The LM head is quantized to int8 (per vocabulary row) in every
method; input embeddings tied to it read the same int8 table, and their lookup is exactly the dequantized
rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from blora import LLM, SamplingParams, load_loras
from blora.lora.context import lora_batch
from blora.lora.layers import LoraLinear
from blora.models.quant import (
    QuantizationError,
    QuantizedEmbedding,
    QuantizedLinear,
    _quantize_int4,
    dequantize_model,
    is_quantized,
    quantize_model,
)
from tests.helpers import assert_greedy_equals_peft, make_adapter, targets, tiny_model, tokenizer
from tests.test_adapter_kinds import make_kind_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("int8", "int4")
# Largest |logit difference| to the unquantized model, relative to the largest |logit| (tiny random
# models, measured: int8 <= 0.009, int4 <= 0.11 on these seeds; random weights have no block structure).
LOGIT_TOL = {"int8": 0.03, "int4": 0.2}
KERNEL_TOL = 1e-2  # kernel vs F.linear on the dequantized weight: bfloat16 activations and outputs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_is_linear_over_dequantized_weight(method, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True).to(dtype)
    quant = QuantizedLinear.from_linear(linear, method)
    x = torch.randn(3, 7, 128, dtype=dtype)
    y = quant(x)
    assert y.shape == (3, 7, 96) and y.dtype == dtype
    ref = nn.functional.linear(x.float(), quant.dequantize(torch.float32), quant.bias.float())
    assert (y.float() - ref).abs().max() <= KERNEL_TOL * ref.abs().max()
    # the dequantized weight is the original up to half a quantization step
    w, deq = linear.weight.float(), quant.dequantize(torch.float32)
    if method == "int8":
        step = quant.scales.float()[:, None]
    else:
        step = quant.scales[..., 0].float().t().repeat_interleave(quant.group_size, dim=1)
    assert ((w - deq).abs() <= step / 2 + 1e-2 * step + 1e-6).all()


def test_int4_values_unpack_the_kernel_packing():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    quant = QuantizedLinear.from_linear(nn.Linear(128, 64, bias=False), "int4")
    packed, scales = _quantize_int4(w, quant.group_size)
    quant.qweight, quant.scales = packed, scales
    values = quant._int4_values()
    assert values.min() >= 0 and values.max() <= 15 and torch.equal(values, values.round())
    # re-packing the unpacked values gives the same bytes
    again = torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)
    assert torch.equal(again, packed)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_logits_close_to_unquantized_model(arch, method):
    model = tiny_model(arch)
    quantized = copy.deepcopy(model)
    count = quantize_model(quantized, method)
    assert count > 0 and is_quantized(quantized)
    head = quantized.get_output_embeddings()
    assert isinstance(head, QuantizedLinear) and head.method == "int8", "the LM head is quantized to int8"
    ids = tokenizer()("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        ref, got = model(ids).logits, quantized(ids).logits
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert 0 < rel <= LOGIT_TOL[method]
    assert quantize_model(quantized, method) == 0  # idempotent


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_tied_head_and_embeddings_share_one_int8_table(arch, method):
    """No float copy of the [vocab, hidden] table is left; the lookup is exactly the dequantized rows, the
    head is ``F.linear`` over them (kernel tolerance)."""
    model = tiny_model(arch)
    float_head = model.get_output_embeddings().weight.detach().clone()
    quantize_model(model, method)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, QuantizedLinear) and head.method == "int8"
    assert isinstance(embed, QuantizedEmbedding) and isinstance(embed, nn.Embedding)
    assert embed.qweight.data_ptr() == head.qweight.data_ptr(), "one int8 table for both"
    assert embed.scales.data_ptr() == head.scales.data_ptr()
    vocab, hidden = float_head.shape
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert not [t for t in floats if t.numel() >= vocab * hidden], "a float [vocab, hidden] table remains"
    table = head.dequantize()
    ids = torch.tensor([[0, 5, vocab - 1, 5], [17, 1, 2, 3]])
    with torch.no_grad():
        rows = embed(ids)
    assert rows.dtype == float_head.dtype and torch.equal(rows, table[ids])
    assert (table.float() - float_head.float()).abs().max() <= head.scales.float().max() / 2 + 1e-6
    x = torch.randn(5, hidden)
    with torch.no_grad():
        ref = nn.functional.linear(x, table.float())
        assert (head(x).float() - ref).abs().max() <= KERNEL_TOL * ref.abs().max()


def test_untied_head_is_quantized_alone():
    model = tiny_model("phi3")  # tie_word_embeddings=False
    quantize_model(model, "int4")
    assert isinstance(model.get_output_embeddings(), QuantizedLinear)
    assert model.get_output_embeddings().method == "int8"
    assert type(model.get_input_embeddings()) is nn.Embedding, "untied embeddings are left as they are"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_dequantized_model_is_tied_again_and_computes_the_same(arch, method):
    """``dequantize_model`` gives plain modules, the head tied to the embeddings again; its logits are the
    quantized model's up to the kernels' bfloat16 activations."""
    model = tiny_model(arch)
    quantize_model(model, method)
    reference = copy.deepcopy(model)
    assert dequantize_model(reference) > 0 and not is_quantized(reference)
    head, embed = reference.get_output_embeddings(), reference.get_input_embeddings()
    assert type(head) is nn.Linear and type(embed) is nn.Embedding and head.weight is embed.weight
    assert torch.equal(embed.weight, model.get_input_embeddings().dequantize())
    ids = tokenizer()("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 2 * KERNEL_TOL


def test_lora_on_quantized_head_and_embeddings_equals_peft(tmp_path):
    """LoRA on lm_head and embed_tokens wraps the int8 head and embeddings like the float ones."""
    base = tiny_model("llama")
    adapter = make_adapter(
        base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head", "embed_tokens"]
    )
    reference = copy.deepcopy(base)
    quantize_model(reference, "int8")
    dequantize_model(reference)
    llm = LLM(copy.deepcopy(base), tokenizer=tokenizer(), adapters={"a": str(adapter)}, quantization="int8")
    prompts, names = ["Hello there", "The cat sat on"], ["a", None]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0), adapters=names)
    assert_greedy_equals_peft(outs, prompts, names, reference, {"a": adapter}, 8)


@pytest.mark.parametrize("method", METHODS)
def test_modules_to_save_copies_of_the_quantized_head_and_embeddings_equal_peft(tmp_path, method):
    """An adapter's own lm_head / embed_tokens (``modules_to_save``) runs as the float layer it trained for
    its rows, next to the int8 head and embeddings the other rows read."""
    base = tiny_model("llama")
    dirs = {
        "head": make_kind_adapter(base, tmp_path / "head", 1, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "emb": make_kind_adapter(base, tmp_path / "emb", 2, r=2, target_modules=["v_proj"], modules_to_save=["embed_tokens"]),
    }  # fmt: skip
    reference = copy.deepcopy(base)
    quantize_model(reference, method)
    dequantize_model(reference)
    llm = LLM(
        copy.deepcopy(base),
        tokenizer=tokenizer(),
        adapters={k: str(v) for k, v in dirs.items()},
        quantization=method,
    )
    head = llm.engine.model.get_output_embeddings()
    assert isinstance(getattr(head, "inner", head), QuantizedLinear)  # the base rows' head stays int8
    prompts, names = ["Hello there", "The cat sat on", "Numbers: 1 2 3"], ["head", None, "emb"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0), adapters=names)
    assert_greedy_equals_peft(outs, prompts, names, reference, dirs, 8)


@pytest.mark.parametrize("method", METHODS)
def test_lora_delta_is_the_unquantized_adapter_math(tmp_path, method):
    """LoRA on minus LoRA off at every adapted layer of a quantized model = scale * B(A x) in float32."""
    model = tiny_model("llama")
    adapter = make_adapter(
        model, tmp_path / "a", seed=3, r=4, lora_alpha=8, target_modules=targets("llama", "all")
    )
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    quantize_model(model, method)
    model, lora_map = load_loras(model, {"a": adapter})
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert len(wrapped) == 3 * 5 and all(isinstance(m.base, QuantizedLinear) for m in wrapped.values())
    x = torch.randn(6, 64)
    for name, layer in wrapped.items():
        key = f"base_model.model.{name}"
        a, b = saved[f"{key}.lora_A.weight"], saved[f"{key}.lora_B.weight"]
        x_in = torch.randn(6, layer.in_features) if layer.in_features != 64 else x
        with torch.no_grad():
            off = layer(x_in)
            with lora_batch(torch.full((6,), lora_map["a"])):
                on = layer(x_in)
        expected = (8 / 4) * (x_in @ a.t()) @ b.t()
        torch.testing.assert_close(on - off, expected, rtol=1e-4, atol=1e-5)
        with lora_batch(torch.full((6,), -1)), torch.no_grad():
            assert torch.equal(layer(x_in), off), "base rows get exactly the quantized base"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_engine_greedy_equals_peft_on_dequantized_model(tmp_path, arch, method):
    base = tiny_model(arch)
    adapter = make_adapter(
        base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=targets(arch, "all")
    )
    reference = copy.deepcopy(base)
    quantize_model(reference, method)
    assert dequantize_model(reference) > 0 and not is_quantized(reference)
    llm = LLM(copy.deepcopy(base), tokenizer=tokenizer(), adapters={"a": str(adapter)}, quantization=method)
    # llama runs on its family forward where the fast path is on (tests/test_quant_fast_path.py), gpt2 never
    assert (llm.engine.runner.fast is not None) == (arch == "llama" and llm.engine.config.fast_path != "off")
    prompts = ["Hello there", "The cat sat on", "Numbers: 1 2 3"]
    names = ["a", None, "a"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0), adapters=names)
    assert_greedy_equals_peft(outs, prompts, names, reference, {"a": adapter}, 8)


def test_int4_refuses_shapes_off_the_group_size():
    model = tiny_model("mistral")  # intermediate_size 96: down_proj has 96 inputs, not a multiple of 64
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.self_attn\.k_proj.*quantization='int8'"):
        quantize_model(model, "int4")
    assert not is_quantized(model), "nothing changes when a layer is refused"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert quantize_model(model, "int8") > 0  # int8 takes it


def test_bad_method_and_mixed_methods_are_refused():
    model = tiny_model("llama")
    with pytest.raises(QuantizationError, match="quantization must be one of int8, int4"):
        quantize_model(model, "q4_0")
    with pytest.raises(QuantizationError, match="quantization must be one of"):
        LLM(model, tokenizer=tokenizer(), quantization="fp8")
    quantize_model(model, "int8")
    with pytest.raises(QuantizationError, match="already quantized .int8.; load it again to use int4"):
        quantize_model(model, "int4")


def test_int8_refuses_inputs_off_its_block():
    with pytest.raises(QuantizationError, match=r"proj: in_features=12 is not a multiple of 8"):
        QuantizedLinear.from_linear(nn.Linear(12, 16), "int8", "proj")


def test_dora_on_a_quantized_base_equals_peft_on_the_dequantized_model(tmp_path):
    """DoRA's norms are taken over the weight the kernel uses (the dequantized one), as PEFT does there."""
    base = tiny_model("llama")
    adapter = make_adapter(
        base, tmp_path / "d", seed=2, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]
    )
    reference = copy.deepcopy(base)
    quantize_model(reference, "int8")
    dequantize_model(reference)
    llm = LLM(copy.deepcopy(base), tokenizer=tokenizer(), adapters={"d": str(adapter)}, quantization="int8")
    outs = llm.generate(["Hello there"], SamplingParams(max_tokens=8, temperature=0), adapters=["d"])
    assert_greedy_equals_peft(outs, ["Hello there"], ["d"], reference, {"d": adapter}, 8)


def test_serve_flag_reaches_the_engine():
    import argparse

    from blora.server.options import add_serve_arguments, engine_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert engine_args(parser.parse_args(["--quantization", "int4"])).kwargs()["quantization"] == "int4"
    assert engine_args(parser.parse_args([])).config.quantization is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "fp8"])
