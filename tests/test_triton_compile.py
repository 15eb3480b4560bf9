"""Every Triton kernel compiles for a Hopper GPU (sm_90, as an H200) down to a cubin, on this CPU machine.

The interpreter tests check what the kernels compute but run them as plain Python; this checks that the
Triton compiler accepts them (language constructs, types, ``tl.dot`` shapes) for each dtype, with the
``ptxas`` that ships in the triton wheel, and no GPU.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from blora.kernels.triton import attention, lora  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
I32, I64 = "i32", "*i64"


def _compile(fn, signature: dict, constexprs: dict):
    if not isinstance(fn, JITFunction):
        pytest.skip("TRITON_INTERPRET is set in this process: the kernels are interpreted functions")
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET)
    assert kernel.asm["cubin"]


@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
def test_kernels_compile_for_sm90(dt):
    prec = "ieee" if dt == "fp32" else None
    seg = dict(token_idx_ptr=I64, seg_start_ptr=I64, seg_len_ptr=I64, seg_slot_ptr=I64)
    strides = dict(stride_hl=I32, stride_hm=I32)
    for split_k in (1, 4):
        _compile(
            lora._sgmv_shrink_kernel,
            dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", h_ptr="*fp32", **seg, a_off_ptr=I64, rank_ptr="*i32",
                 num_slots=I32, num_slices=I32, K=I32, stride_xm=I32, **strides),
            dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=64, SPLIT_K=split_k, UPCAST=False, PRECISION=prec),
        )  # fmt: skip
    for h in ("fp32", dt):  # add_lora's float32 intermediate, the backend's expand() of a dtype one
        _compile(
            lora._sgmv_expand_kernel,
            dict(y_ptr=f"*{dt}", w_ptr=f"*{dt}", h_ptr=f"*{h}", **seg, b_off_ptr=I64, rank_ptr="*i32",
                 slice_out_ptr="*i32", slice_col_ptr="*i32", num_slots=I32, num_slices=I32, stride_ym=I32,
                 **strides),
            dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, UPCAST=False, PRECISION=prec),
        )  # fmt: skip
    _compile(
        lora._bgmv_shrink_kernel,
        dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", h_ptr="*fp32", token_slot_ptr=I64, a_off_ptr=I64, rank_ptr="*i32",
             num_slots=I32, K=I32, stride_xm=I32, **strides),
        dict(BLOCK_R=16, BLOCK_K=64),
    )  # fmt: skip
    _compile(
        lora._bgmv_expand_kernel,
        dict(y_ptr=f"*{dt}", w_ptr=f"*{dt}", h_ptr="*fp32", token_slot_ptr=I64, b_off_ptr=I64, rank_ptr="*i32",
             slice_out_ptr="*i32", slice_col_ptr="*i32", num_slots=I32, stride_ym=I32, **strides),
        dict(BLOCK_N=64, BLOCK_R=16),
    )  # fmt: skip
    for windowed in (False, True):
        _compile(
            attention._decode_kernel,
            dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", o_ptr=f"*{dt}", rows_ptr=I64, slots_ptr=I64,
                 lens_ptr=I64, scale="fp32", window=I32, n_rep=I32, stride_qh=I32, stride_qn=I32,
                 stride_kh=I32, stride_ks=I32, stride_sb=I32, stride_ob=I32, stride_oh=I32),
            dict(HEAD_DIM=128, BLOCK_H=16, BLOCK_N=32, BLOCK_D=128, WINDOWED=windowed, UPCAST=False,
                 PRECISION=prec),
        )  # fmt: skip
