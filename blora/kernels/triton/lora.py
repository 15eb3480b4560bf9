"""Multi-LoRA shrink/expand in Triton: SGMV (segments of tokens sharing an adapter) and BGMV (one adapter
per token), each adapter at its own rank, all output slices of a fused layer in one launch.

For a layer with weights in ``LoraWeights`` and a step's ``LoraKernelMeta``, ``add_lora`` computes

    h[l, t, :r]  = x[t] @ A[l, s_t]^T          (shrink, r = rank of slot s_t on slice l, fp32 accumulation)
    y[t, col_l:col_l + out_l] += h[l, t, :r] @ B[l, s_t]     (expand, added in fp32, stored in y's dtype)

for every token ``t`` with ``s_t >= 0``; base rows (``s_t = -1``) and slices a slot does not target
(rank 0) are never touched, without extra launches. Ranks: the launch grid spans the step's largest rank
in blocks of ``BLOCK_R``; a program whose rank block starts at or above its adapter's rank returns at once,
and the last block of an adapter is masked, so the work and the weight bytes read follow each adapter's
own rank, rounded up to ``BLOCK_R`` (16) in the segment kernels' matrix products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blora.kernels.triton import interpreting, precision
from blora.kernels.triton.lora_meta import LoraKernelMeta
from blora.kernels.triton.lora_weights import LoraWeights

BLOCK_M = 16  # tokens per segment-kernel program (tl.dot needs >= 16)
BLOCK_R = 16  # ranks per program / per inner step
BLOCK_K = 64  # input features per inner step of the shrink
BLOCK_N = 64  # output features per expand program
SPLIT_K_TARGET = 256  # shrink programs wanted before splitting the input dimension across programs


def _flags(dtype: torch.dtype) -> dict:
    # Triton 3.9's interpreter computes tl.dot of bfloat16 operands wrongly (its numpy path has no bf16):
    # there the operands go to float32 first. fp32 products use IEEE precision (no TF32) to match PEFT.
    return {"UPCAST": interpreting() and dtype == torch.bfloat16, "PRECISION": precision(dtype)}


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, w_ptr, h_ptr, token_idx_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, a_off_ptr, rank_ptr,
    num_slots, num_slices, K, stride_xm, stride_hl, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_rk, pid_gl = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seg, sl = pid_gl // num_slices, pid_gl % num_slices
    pid_r, pid_k = pid_rk // SPLIT_K, pid_rk % SPLIT_K
    slot = tl.load(seg_slot_ptr + seg)
    if slot >= num_slots:  # an adapter of the step without weights in this layer
        return
    n = tl.load(seg_len_ptr + seg)
    rank = tl.load(rank_ptr + sl * num_slots + slot)
    if (pid_m * BLOCK_M >= n) | (pid_r * BLOCK_R >= rank):  # `|`: Triton compiles no chained `or`
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    tok = tl.load(token_idx_ptr + tl.load(seg_start_ptr + seg) + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    a_base = w_ptr + tl.load(a_off_ptr + sl * num_slots + slot)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + tok[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :]
        )
        a = tl.load(a_base + offs_r[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_r[None, :])
        if UPCAST:
            x, a = x.to(tl.float32), a.to(tl.float32)
        acc += tl.dot(x, a, input_precision=PRECISION)
    h = h_ptr + sl * stride_hl + tok[:, None] * stride_hm + offs_r[None, :]
    if SPLIT_K == 1:
        tl.store(h, acc, mask=mask_m[:, None] & mask_r[None, :])
    else:
        tl.atomic_add(h, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _sgmv_expand_kernel(
    y_ptr, w_ptr, h_ptr, token_idx_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, b_off_ptr, rank_ptr,
    slice_out_ptr, slice_col_ptr, num_slots, num_slices, stride_ym, stride_hl, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, pid_gl = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seg, sl = pid_gl // num_slices, pid_gl % num_slices
    slot = tl.load(seg_slot_ptr + seg)
    if slot >= num_slots:
        return
    n = tl.load(seg_len_ptr + seg)
    rank = tl.load(rank_ptr + sl * num_slots + slot)
    out = tl.load(slice_out_ptr + sl)
    if (pid_m * BLOCK_M >= n) | (pid_n * BLOCK_N >= out) | (rank == 0):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    tok = tl.load(token_idx_ptr + tl.load(seg_start_ptr + seg) + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out
    b_base = w_ptr + tl.load(b_off_ptr + sl * num_slots + slot)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        h_tile = h_ptr + sl * stride_hl + tok[:, None] * stride_hm + offs_r[None, :]
        h = tl.load(h_tile, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_base + offs_r[:, None] * out + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :])
        if UPCAST:
            h, b = h.to(w_ptr.dtype.element_ty).to(tl.float32), b.to(tl.float32)
        else:
            h = h.to(w_ptr.dtype.element_ty)  # the intermediate rounds to the weights' dtype, as in PEFT
        acc += tl.dot(h, b, input_precision=PRECISION)
    col = tl.load(slice_col_ptr + sl)
    y = y_ptr + tok[:, None] * stride_ym + col + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(y, (tl.load(y, mask=mask).to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, w_ptr, h_ptr, token_slot_ptr, a_off_ptr, rank_ptr,
    num_slots, K, stride_xm, stride_hl, stride_hm,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t, pid_r, sl = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(token_slot_ptr + t)
    if (slot < 0) | (slot >= num_slots):  # base row, or an adapter without weights in this layer
        return
    rank = tl.load(rank_ptr + sl * num_slots + slot)
    if pid_r * BLOCK_R >= rank:
        return
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    a_base = w_ptr + tl.load(a_off_ptr + sl * num_slots + slot)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + t.to(tl.int64) * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        a = tl.load(a_base + offs_r[:, None] * K + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :])
        acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    tl.store(h_ptr + sl * stride_hl + t.to(tl.int64) * stride_hm + offs_r, acc, mask=mask_r)


@triton.jit
def _bgmv_expand_kernel(
    y_ptr, w_ptr, h_ptr, token_slot_ptr, b_off_ptr, rank_ptr, slice_out_ptr, slice_col_ptr,
    num_slots, stride_ym, stride_hl, stride_hm,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    t, pid_n, sl = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(token_slot_ptr + t)
    if (slot < 0) | (slot >= num_slots):  # base row, or an adapter without weights in this layer
        return
    rank = tl.load(rank_ptr + sl * num_slots + slot)
    out = tl.load(slice_out_ptr + sl)
    if (pid_n * BLOCK_N >= out) | (rank == 0):
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out
    b_base = w_ptr + tl.load(b_off_ptr + sl * num_slots + slot)
    t64 = t.to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        h = tl.load(h_ptr + sl * stride_hl + t64 * stride_hm + offs_r, mask=mask_r, other=0.0)
        h = h.to(w_ptr.dtype.element_ty).to(tl.float32)  # rounded to the weights' dtype, as in PEFT
        b = tl.load(b_base + offs_r[:, None] * out + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :])
        acc += tl.sum(h[:, None] * b.to(tl.float32), axis=0)
    y = y_ptr + t64 * stride_ym + tl.load(slice_col_ptr + sl) + offs_n
    tl.store(y, (tl.load(y, mask=mask_n).to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask_n)


def split_k(programs: int, in_features: int) -> int:
    """Input-dimension split of the segment shrink: few programs (decode, few adapters) leave most of a GPU
    idle, so each (segment, rank block) is cut into up to 16 slices of the input summed with atomics."""
    s = 1
    while programs * s < SPLIT_K_TARGET and s < 16 and in_features >= 2 * s * BLOCK_K:
        s *= 2
    return s


def sgmv_shrink(x: torch.Tensor, w: LoraWeights, meta: LoraKernelMeta, h: torch.Tensor, rank: int) -> None:
    """Segments shrink into ``h`` [L, N, >= rank] float32 (zeroed by the caller when split).

    Semantics: ``h[l, t, :r] = x[t].float() @ A[l, s_t].T.float()`` for each token in a segment."""
    grid_m, grid_r = triton.cdiv(meta.max_seg_len, BLOCK_M), triton.cdiv(rank, BLOCK_R)
    sk = split_k(grid_m * grid_r * meta.num_segments * w.num_slices, w.in_features)
    if sk > 1:
        h.zero_()
    grid = (grid_m, grid_r * sk, meta.num_segments * w.num_slices)
    _sgmv_shrink_kernel[grid](
        x, w.base, h, meta.token_idx, meta.seg_start, meta.seg_len, meta.seg_slot, w.a_off, w.ranks,
        w.num_slots, w.num_slices, w.in_features, x.stride(0), h.stride(0), h.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, SPLIT_K=sk, **_flags(w.dtype),
    )  # fmt: skip


def sgmv_expand(y: torch.Tensor, w: LoraWeights, meta: LoraKernelMeta, h: torch.Tensor) -> None:
    """Segments expand. Semantics: ``y[t, col_l:col_l+out_l] += h[l, t, :r].to(w.dtype) @ B[l, s_t]``."""
    grid = (
        triton.cdiv(meta.max_seg_len, BLOCK_M),
        triton.cdiv(w.max_out, BLOCK_N),
        meta.num_segments * w.num_slices,
    )
    _sgmv_expand_kernel[grid](
        y, w.base, h, meta.token_idx, meta.seg_start, meta.seg_len, meta.seg_slot, w.b_off, w.ranks,
        w.slice_out, w.slice_col, w.num_slots, w.num_slices, y.stride(0), h.stride(0), h.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, **_flags(w.dtype),
    )  # fmt: skip


def bgmv_shrink(x: torch.Tensor, w: LoraWeights, meta: LoraKernelMeta, h: torch.Tensor, rank: int) -> None:
    """Per-token shrink. Semantics: as ``sgmv_shrink``, one program per (token, rank block, slice)."""
    grid = (meta.num_tokens, triton.cdiv(rank, BLOCK_R), w.num_slices)
    _bgmv_shrink_kernel[grid](
        x, w.base, h, meta.token_slot, w.a_off, w.ranks, w.num_slots, w.in_features,
        x.stride(0), h.stride(0), h.stride(1), BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
    )  # fmt: skip


def bgmv_expand(y: torch.Tensor, w: LoraWeights, meta: LoraKernelMeta, h: torch.Tensor) -> None:
    """Per-token expand. Semantics: as ``sgmv_expand``, one program per (token, output block, slice)."""
    grid = (meta.num_tokens, triton.cdiv(w.max_out, BLOCK_N), w.num_slices)
    _bgmv_expand_kernel[grid](
        y, w.base, h, meta.token_slot, w.b_off, w.ranks, w.slice_out, w.slice_col, w.num_slots,
        y.stride(0), h.stride(0), h.stride(1), BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
    )  # fmt: skip


def add_lora(
    y: torch.Tensor, x: torch.Tensor, w: LoraWeights, meta: LoraKernelMeta, method: str | None = None
) -> None:
    """Add every token's LoRA into ``y`` [N, sum(out_l)] in place, ``x`` [N, in] (rows contiguous).

    Two launches per layer whatever the number of adapters, slices and ranks: shrink then expand, by
    segments (``"sgmv"``) or per token (``"bgmv"``); ``None`` picks with ``meta.prefer_sgmv()``.
    Semantics: ``add_lora_reference``.
    """
    rank = w.step_rank(meta.active)
    if rank == 0:
        return
    if x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("add_lora needs x and y with contiguous rows (stride 1 along features)")
    h = torch.empty(w.num_slices, meta.num_tokens, rank, dtype=torch.float32, device=x.device)
    if method is None:
        method = "sgmv" if meta.prefer_sgmv() else "bgmv"
    if method == "sgmv":
        sgmv_shrink(x, w, meta, h, rank)
        sgmv_expand(y, w, meta, h)
    elif method == "bgmv":
        bgmv_shrink(x, w, meta, h, rank)
        bgmv_expand(y, w, meta, h)
    else:
        raise ValueError(f"method must be 'sgmv', 'bgmv' or None, got {method!r}")


def add_lora_reference(y: torch.Tensor, x: torch.Tensor, w: LoraWeights, slots: list[int]) -> None:
    """Plain torch, one token at a time, float32 accumulation (the definition the kernels are tested on).

    Semantics: ``y[t, col_l:col_l + out_l] += (x[t] @ A[l, s_t]).to(w.dtype) @ B[l, s_t]`` for every token
    with ``s_t >= 0`` and slice ``l`` where slot ``s_t`` has weights.
    """
    col = 0
    for sl, out in enumerate(w.out_features):
        for t, s in enumerate(slots):
            pair = w.pairs[sl].get(s)
            if pair is None:
                continue
            a, b = pair[0].float(), pair[1].float()
            h = (x[t].float() @ a).to(w.dtype).float()
            y[t, col : col + out] = (y[t, col : col + out].float() + h @ b).to(y.dtype)
        col += out
