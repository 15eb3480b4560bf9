"""blora's int8 kernel (``CpuKernel.int8_linear``) and the blocked layout ``QuantizedLinear`` keeps for it.

The kernel computes ``round_bf16(scale[n] * sum_k x[m, k] * q[n, k])`` with float32 products (exact: a
bfloat16 times an int8 value) and float32 sums, over q stored in blocks of 16 output rows. It is checked
against that formula in float64 for row counts around its 4-row passes and input sizes off its 4-column
unroll, in the AVX-512 and the portable build; the layer keeps [out, in] rows (PyTorch's kernel) where its
rows are not a multiple of 16 or the kernel is turned off, and both layouts compute the same layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from blora import LLM, SamplingParams, kernels
from blora.models.quant import (
    INT8_BLOCK,
    INT8_GEMM_ROWS,
    QuantizedEmbedding,
    QuantizedLinear,
    from_blocks,
    fuse_quantized,
    quantize_model,
    to_blocks,
)
from tests.helpers import tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread", "needs_kernels")

ULP = 2**-8  # one bfloat16 step, relative


def quantized(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q [out, in] in -127..127, bfloat16 scales [out])."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out_f, in_f), generator=g).to(torch.int8)
    scales = (torch.rand(out_f, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    return q, scales


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("in_f,out_f", [(64, 16), (42, 48), (576, 96)])
def test_kernel_is_the_scaled_float_sum(generic, rows, in_f, out_f):
    kernel = kernels.get(generic=generic)
    assert kernel is not None
    q, scales = quantized(out_f, in_f)
    x = torch.randn(rows, 2 * in_f, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)[:, ::2]
    x = x.contiguous()[:, :in_f]  # unit column stride, a row stride of its own
    y = kernel.int8_linear(x, to_blocks(q), scales)
    exact = (x.double() @ q.double().t()) * scales.double()
    assert y.shape == (rows, out_f) and y.dtype == torch.bfloat16
    assert ((y.double() - exact).abs() <= 2 * ULP * exact.abs() + 1e-6 * exact.abs().max()).all()


@pytest.mark.parametrize("generic", [False, True])
def test_dequantized_blocks_are_the_layers_dequantized_weight(generic):
    kernel = kernels.get(generic=generic)
    assert kernel is not None
    quant = QuantizedLinear.from_linear(linear(48, 40), "int8")
    assert quant.blocked
    assert torch.equal(kernel.int8_dequantize(quant.qweight, quant.scales), quant.dequantize())


def test_prefill_sized_batches_run_the_bfloat16_gemm_over_the_dequantized_weight():
    """From ``INT8_GEMM_ROWS`` rows the layer is exactly ``F.linear`` over its dequantized bfloat16 weight;
    below, the int8 kernel (within a bfloat16 step of it)."""
    quant = QuantizedLinear.from_linear(linear(96), "int8")
    torch.manual_seed(3)
    for rows in (INT8_GEMM_ROWS - 1, INT8_GEMM_ROWS, INT8_GEMM_ROWS + 37):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        ref = nn.functional.linear(x, quant.dequantize())
        if rows >= INT8_GEMM_ROWS:
            assert torch.equal(quant(x), ref)
        else:
            assert (quant(x).float() - ref.float()).abs().max() <= 2 * ULP * ref.float().abs().max()


def test_blocks_round_trip_and_keep_each_row():
    q, _ = quantized(48, 40)
    blocks = to_blocks(q)
    assert blocks.shape == (3, 40, INT8_BLOCK)
    assert torch.equal(from_blocks(blocks), q)
    assert torch.equal(blocks[1, :, 5], q[INT8_BLOCK + 5])


def linear(out_f: int, in_f: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)


def test_layouts_compute_the_same_layer():
    """Blocked (blora's kernel) and rows (PyTorch's ``_weight_int8pack_mm``): the same values and scales,
    the same layer up to the order of the float32 sums."""
    base = linear(96)
    blocked = QuantizedLinear.from_linear(base, "int8")
    rows = QuantizedLinear.from_linear(base, "int8", kernel=False)
    assert blocked.blocked and not rows.blocked and rows.qweight.shape == (96, 64)
    assert torch.equal(blocked.int8_rows(), rows.qweight) and torch.equal(blocked.scales, rows.scales)
    assert torch.equal(blocked.dequantize(), rows.dequantize())
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    a, b = blocked(x).float(), rows(x).float()
    assert (a - b).abs().max() <= ULP * b.abs().max()


def test_rows_not_a_multiple_of_16_keep_the_rows_layout():
    quant = QuantizedLinear.from_linear(linear(24), "int8")
    assert not quant.blocked and quant.qweight.shape == (24, 64)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ref = nn.functional.linear(x.float(), quant.dequantize(torch.float32))
    assert (quant(x).float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_fused_blocked_parts_are_views_and_compute_the_same():
    parts = [QuantizedLinear.from_linear(linear(n, seed=i), "int8") for i, n in enumerate((64, 16, 16))]
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    before = [p(x) for p in parts]
    fused = fuse_quantized(parts)
    assert isinstance(fused, QuantizedLinear) and fused.blocked and fused.qweight.shape == (6, 64, 16)
    base = fused.qweight.untyped_storage().data_ptr()
    assert all(p.qweight.untyped_storage().data_ptr() == base for p in parts)
    assert torch.equal(fused(x), torch.cat(before, dim=1))
    assert all(torch.equal(p(x), b) for p, b in zip(parts, before, strict=True))
    mixed = [
        QuantizedLinear.from_linear(linear(16), "int8"),
        QuantizedLinear.from_linear(linear(16), "int8", kernel=False),
    ]
    assert "layout" in fuse_quantized(mixed)


def test_embeddings_tied_to_a_blocked_head_look_up_the_dequantized_rows():
    head = QuantizedLinear.from_linear(linear(48, 32), "int8")
    embed = QuantizedEmbedding.tied_to(head)
    assert embed.blocked and (embed.num_embeddings, embed.embedding_dim) == (48, 32)
    ids = torch.tensor([[0, 17, 47], [16, 5, 31]])
    assert torch.equal(embed(ids), head.dequantize()[ids])


def test_kernel_off_quantizes_to_rows_and_generates_the_same_tokens():
    """``LLM(cpu_kernel=False)``: PyTorch's int8 kernel over rows; greedy tokens equal blora's kernel's."""
    prompts = ["Hello there", "The cat sat on"]
    params = SamplingParams(max_tokens=8, temperature=0)
    outs, layouts = {}, {}
    for on in (True, False):
        llm = LLM(tiny_model("llama"), tokenizer=tokenizer(), quantization="int8", cpu_kernel=on)
        layers = [m for m in llm.engine.model.modules() if isinstance(m, QuantizedLinear)]
        layouts[on] = {m.blocked for m in layers}
        outs[on] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert layouts == {True: {True}, False: {False}}
    assert outs[True] == outs[False]


def test_quantize_model_without_the_kernel_keeps_rows():
    model = tiny_model("llama")
    quantize_model(copy.deepcopy(model), "int8")  # blocked (the default where the kernel builds)
    quantize_model(model, "int8", kernel=False)
    assert not any(m.blocked for m in model.modules() if isinstance(m, QuantizedLinear))
