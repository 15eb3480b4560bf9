"""Triton multi-LoRA kernels (SGMV / BGMV shrink+expand, fused slices) against their reference op, under
Triton's CPU interpreter (see ``tests/triton_interp.py``): mixed ranks 1-64 in one call, ragged and empty
segments, base rows, slots without weights in a layer, split input dimension, fp32 / fp16 / bf16."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interp import IN_CHILD, run_checks

if IN_CHILD:
    from blora.kernels.triton.lora import add_lora, add_lora_reference, split_k
    from blora.kernels.triton.lora_meta import LoraKernelMeta
    from blora.kernels.triton.lora_weights import LoraWeights

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tolerances relative to the output's magnitude: fp32 accumulation everywhere, one rounding of the
# rank-sized intermediate and of the output to the dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def test_lora_kernels_under_interpreter():
    run_checks(__file__)


def _weights(dtype, in_features, outs, ranks: dict[int, int], skip=(), seed=0) -> LoraWeights:
    """Slot -> rank on every slice except the (slot, slice) pairs in ``skip``; A [in, r] as the transposed
    view of a row-major [r, in] tensor (the store's layout), B [r, out] with non-zero entries."""
    g = torch.Generator().manual_seed(seed)
    slices = []
    for i, out in enumerate(outs):
        sl = {}
        for s, r in ranks.items():
            if (s, i) not in skip:
                a = (torch.randn(r, in_features, generator=g) / in_features**0.5).to(dtype).t()
                b = torch.randn(r, out, generator=g).to(dtype)
                sl[s] = (a, b)
        slices.append(sl)
    return LoraWeights(slices, in_features, outs, "cpu", dtype)


def _check(w: LoraWeights, slots: list[int], method: str | None, dtype) -> None:
    x = torch.randn(len(slots), w.in_features, dtype=dtype)
    y0 = torch.randn(len(slots), w.total_out, dtype=dtype)
    got, want = y0.clone(), y0.clone()
    add_lora(got, x, w, LoraKernelMeta.build(slots, "cpu"), method)
    add_lora_reference(want, x, w, slots)
    scale = (want.float() - y0.float()).abs().max().item()
    assert scale > 0.1  # the adapters really change the output
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[dtype] * max(scale, y0.float().abs().max().item()), (method, dtype, err, scale)
    base_rows = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(got[base_rows], y0[base_rows])  # base rows untouched, bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["sgmv", "bgmv"])
def check_mixed_ranks_fused_slices(method, dtype):
    # q/k/v-like slices (GQA widths), ranks 1..64 in one call, slot 3 without LoRA on the k slice
    w = _weights(dtype, 48, (40, 24, 24), {0: 1, 1: 64, 2: 8, 5: 17}, skip={(5, 1)})
    slots = [0, 0, -1, 1, 1, 2, 1, 5, 5, 5, -1, 0] if method == "bgmv" else [0, 0, -1, 1, 1, 2, 1] + [5] * 19
    _check(w, slots, method, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def check_single_slice_long_segments(dtype):
    # a prefill-like step: segments longer than one block (ragged), split input dimension (in=256)
    w = _weights(dtype, 256, (32,), {0: 16, 3: 4})
    slots = [3] * 21 + [-1] * 3 + [0] * 17
    meta = LoraKernelMeta.build(slots, "cpu")
    assert meta.prefer_sgmv() and split_k(meta.num_segments * 2, 256) > 1
    _check(w, slots, None, dtype)


def check_gate_up_and_steps_with_nothing_to_do():
    w = _weights(torch.float32, 32, (48, 48), {1: 8, 2: 2})
    _check(w, [2, 1, -1, 2], "sgmv", torch.float32)
    for slots in ([-1, -1, -1], [7, 7, -1]):  # only base rows; an adapter this layer has no weights for
        x, y = torch.randn(3, 32), torch.randn(3, 96)
        for method in ("sgmv", "bgmv"):
            out = y.clone()
            add_lora(out, x, w, LoraKernelMeta.build(slots, "cpu"), method)
            assert torch.equal(out, y)


def check_output_column_slice_and_meta():
    """``y`` may be a column slice of a wider output (row stride > width); metadata packs the segments."""
    w = _weights(torch.float32, 32, (16,), {0: 4, 1: 8})
    slots = [1, -1, 0, 1, 1]
    meta = LoraKernelMeta.build(slots, "cpu")
    assert meta.active == (0, 1) and meta.max_seg_len == 3 and meta.num_segments == 2
    assert meta.token_idx.tolist() == [2, 0, 3, 4] and meta.seg_len.tolist() == [1, 3]
    assert meta.seg_start.tolist() == [0, 1] and meta.token_slot.tolist() == slots
    wide = torch.randn(5, 40)
    want = wide.clone()
    x = torch.randn(5, 32)
    add_lora(wide[:, 8:24], x, w, meta, "sgmv")
    add_lora_reference(want[:, 8:24], x, w, slots)
    torch.testing.assert_close(wide, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(wide[:, :8], want[:, :8]) and torch.equal(wide[:, 24:], want[:, 24:])


def check_bad_shapes_are_refused():
    a = torch.randn(4, 32).t()
    with pytest.raises(ValueError, match=r"slot 3 slice 0: expected A \[32, r\] and B \[r, 16\]"):
        LoraWeights([{3: (a, torch.randn(4, 15))}], 32, (16,), "cpu", torch.float32)
