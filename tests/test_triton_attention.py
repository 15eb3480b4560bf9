"""Triton paged decode attention against its reference and the engine's PyTorch decode path, under Triton's
CPU interpreter (see ``tests/triton_interp.py``): GQA, sliding window, padded slot rows, three dtypes."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interp import IN_CHILD, run_checks

if IN_CHILD:
    from blora.engine.attention import AttentionMetadata, _decode_torch
    from blora.kernels.triton.attention import paged_decode_attention, paged_decode_attention_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def test_attention_kernel_under_interpreter():
    run_checks(__file__)


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
