"""Paged decode attention in Triton, reading keys and values from the engine's paged cache in place.

Cache layout (``blora.engine.attention.KVCache``): per layer ``k_cache``/``v_cache`` [KVH, num_slots, D];
a decode query ``b`` attends over the cache slots ``slots[b, :context_lens[b]]`` (rows padded with the
cache's zeroed null slot). One program per (sequence, K/V head) serves all ``H // KVH`` query heads sharing
that K/V head (GQA: each key and value is read once per group), walks the context in blocks of
``BLOCK_N`` slots with an online float32 softmax, and skips the blocks before a sliding window entirely.

Prefill is not here: chunks with several queries use PyTorch's ``scaled_dot_product_attention`` over the
sequence's keys and values gathered from the cache (the engine's ``_prefill``), which runs on any device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blora.kernels.triton import interpreting, precision

BLOCK_N = 32  # cache slots per inner step


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rows_ptr, slots_ptr, lens_ptr,
    scale, window, n_rep, stride_qh, stride_qn, stride_kh, stride_ks, stride_sb, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOWED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b, kvh = tl.program_id(0), tl.program_id(1)
    row = tl.load(rows_ptr + b).to(tl.int64)
    n_ctx = tl.load(lens_ptr + b)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < n_rep
    mask_d = offs_d < HEAD_DIM
    heads = kvh * n_rep + offs_h
    q = tl.load(
        q_ptr + heads[:, None] * stride_qh + row * stride_qn + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )
    q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    first = 0
    if WINDOWED:
        first = tl.maximum(n_ctx - window, 0)
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_kh
    for n0 in range((first // BLOCK_N) * BLOCK_N, n_ctx, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = (offs_n < n_ctx) & (offs_n >= first)
        slot = tl.load(slots_ptr + b.to(tl.int64) * stride_sb + offs_n, mask=valid, other=0).to(tl.int64)
        kv_off = slot[:, None] * stride_ks + offs_d[None, :]
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_head + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_head + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_H, BLOCK_N], float32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o = o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o, out.to(o_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])


def paged_decode_attention(
    query: torch.Tensor,
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Decode attention over the paged cache -> [Bd, H, D] in ``query``'s dtype.

    ``query`` [H, N, D] (last dim contiguous; the flat batch's queries), ``rows`` [Bd] the decode rows of it,
    ``k_cache``/``v_cache`` [KVH, num_slots, D], ``slots`` [Bd, L] (row stride any, slot stride 1),
    ``context_lens`` [Bd] (>= 1). Semantics: ``paged_decode_attention_reference``.
    """
    h, _, d = query.shape
    kvh = k_cache.shape[0]
    if h % kvh or query.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("paged_decode_attention: H must be a multiple of KVH, with contiguous head dims")
    if slots.stride(-1) != 1:
        slots = slots.contiguous()
    bd = rows.numel()
    out = query.new_empty(bd, h, d)
    n_rep = h // kvh
    # tl.dot needs >= 16 rows: the query heads of a group are padded (masked) up to 16
    block_h = max(16, triton.next_power_of_2(n_rep))
    _decode_kernel[(bd, kvh)](
        query, k_cache, v_cache, out, rows, slots, context_lens,
        float(scale), int(sliding_window or 0), n_rep, query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), slots.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_H=block_h, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)),
        WINDOWED=sliding_window is not None, UPCAST=interpreting() and query.dtype == torch.bfloat16, PRECISION=precision(query.dtype),
    )  # fmt: skip
    return out


def paged_decode_attention_reference(
    query: torch.Tensor,
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Plain torch, one sequence at a time, float32 softmax.

    Semantics: for sequence b, query head j and its K/V head ``j // (H // KVH)``:
    ``softmax(q[j, rows[b]] @ K[kv, slots_b].T * scale) @ V[kv, slots_b]`` over the keys at positions
    ``p < context_lens[b]`` (and ``p > context_lens[b] - 1 - sliding_window`` with a window).
    """
    h, _, d = query.shape
    n_rep = h // k_cache.shape[0]
    out = query.new_empty(rows.numel(), h, d)
    for b in range(rows.numel()):
        n = int(context_lens[b])
        first = max(0, n - sliding_window) if sliding_window is not None else 0
        idx = slots[b, first:n].long()
        q = query[:, int(rows[b])].float()  # [H, D]
        k = k_cache[:, idx].float().repeat_interleave(n_rep, 0)  # [H, n, D]
        v = v_cache[:, idx].float().repeat_interleave(n_rep, 0)
        probs = torch.softmax(torch.einsum("hd,hnd->hn", q, k) * scale, dim=-1)
        out[b] = torch.einsum("hn,hnd->hd", probs, v).to(query.dtype)
    return out
