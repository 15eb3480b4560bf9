"""The C++ paged decode attention against a float64 reference and against the PyTorch decode path."""

from __future__ import annotations

import pytest
import torch

from blora import kernels
from blora.engine import attention
from blora.engine.attention import AttentionMetadata

from .test_lora_ops import _kernel


def _case(h, kvh, d, lens, dtype, *, block_size=4, extra_rows=0, seed=0):
    """A shuffled paged cache holding ``len(lens)`` sequences, their queries laid out as transformers
    passes them ([1, H, N, D] viewed from [1, N, H, D]), and the decode metadata the model runner builds."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()  # blocks of a sequence are not adjacent
    tables, used = [], 0
    for nb in blocks_per_seq:
        tables.append(order[used : used + nb])
        used += nb
    slots_total = num_blocks * block_size + 1
    k_cache = torch.randn(kvh, slots_total, d, generator=gen).to(dtype)
    v_cache = torch.randn(kvh, slots_total, d, generator=gen).to(dtype)
    n_rows = len(lens) + extra_rows
    query = torch.randn(1, n_rows, h, d, generator=gen).to(dtype).transpose(1, 2)  # strided, as in HF
    rows = torch.randperm(n_rows, generator=gen)[: len(lens)] if extra_rows else torch.arange(len(lens))
    width = max(blocks_per_seq) * block_size
    slots = torch.full((len(lens), width), slots_total - 1, dtype=torch.long)
    for b, (table, n) in enumerate(zip(tables, lens, strict=True)):
        for p in range(n):
            slots[b, p] = table[p // block_size] * block_size + p % block_size
    meta = AttentionMetadata(num_tokens=n_rows, slot_mapping=torch.zeros(n_rows, dtype=torch.long))
    meta.decode_rows = rows
    meta.decode_slots = slots
    meta.decode_context_lens = torch.tensor(lens, dtype=torch.long)
    meta.all_decode = extra_rows == 0
    return query, k_cache, v_cache, meta


def _reference(query, k_cache, v_cache, meta, scale, window):
    """float64, one sequence and head at a time: softmax(q K^T * scale) V over the attended positions."""
    h, d = query.shape[1], query.shape[3]
    kvh = k_cache.shape[0]
    out = torch.empty(len(meta.decode_context_lens), h, d, dtype=torch.float64)
    for b, n in enumerate(meta.decode_context_lens.tolist()):
        start = max(0, n - window) if window else 0
        idx = meta.decode_slots[b, start:n]
        q = query[0, :, meta.decode_rows[b]].double()  # [H, D]
        for j in range(h):
            g = j // (h // kvh)
            k, v = k_cache[g, idx].double(), v_cache[g, idx].double()
            out[b, j] = torch.softmax(q[j] @ k.T * scale, dim=-1) @ v
    return out


CASES = [  # (H, KVH, D, context lengths)
    (9, 3, 64, [1, 5, 17, 40, 33]),  # SmolLM2's heads; a one-token context
    (4, 4, 16, [3, 16, 31]),  # no GQA
    (8, 2, 24, [7, 2, 19, 64]),  # D with a vector tail; 4 query heads per K/V head
    (6, 1, 80, [12, 50]),  # 6 heads per K/V head: a group of 4 and one of 2
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("generic", [False, True], ids=["native", "generic"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}")
@pytest.mark.parametrize("window", [None, 6], ids=["full", "window6"])
@pytest.mark.parametrize("extra_rows", [0, 3], ids=["all_decode", "mixed"])
def test_decode_kernel_matches_reference(dtype, generic, case, window, extra_rows):
    h, kvh, d, lens = case
    kernel = _kernel(generic)
    query, k_cache, v_cache, meta = _case(h, kvh, d, lens, dtype, extra_rows=extra_rows, seed=len(lens) + d)
    scale = 0.7 * d**-0.5
    rows = None if meta.all_decode else meta.decode_rows
    out = kernel.decode_attention(
        query[0], rows, k_cache, v_cache, meta.decode_slots, meta.decode_context_lens, scale, window
    )
    assert out.dtype == dtype and out.shape == (len(lens), h, d)
    expected = _reference(query, k_cache, v_cache, meta, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the output
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    torch_path = attention._decode_torch(query, k_cache, v_cache, meta, scale, window)
    torch.testing.assert_close(torch_path.double(), expected, atol=10 * tol, rtol=10 * tol)


def test_engine_uses_the_kernel_only_where_it_applies():
    query, k_cache, _, _ = _case(4, 2, 16, [3], torch.float32)
    kernel = kernels.get()
    # only an AVX-512 build: the portable build's attention is slower than the PyTorch path
    native = kernel is not None and kernel.native_vector
    assert (attention._kernel_for(query, k_cache) is not None) == native
    assert attention._kernel_for(query.half(), k_cache.half()) is None  # float16: PyTorch path
    assert attention._kernel_for(query, k_cache.bfloat16()) is None  # cache dtype differs
    assert attention._kernel_for(torch.randn(1, 4, 3, 32)[..., ::2], k_cache) is None  # D not unit-stride
