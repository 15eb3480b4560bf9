"""The engine's small C++ ops (fast path and sampler) against the PyTorch ops they replace, both builds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .test_lora_ops import _kernel

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    # float32: only the order of a float32 sum differs; bfloat16: PyTorch's rounding steps are reproduced
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0, "rtol": 0}


@pytest.fixture(params=[False, True], ids=["native", "generic"])
def kernel(request):
    return _kernel(request.param)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("hid", [576, 40, 7])
def test_rms_norm_with_and_without_residual(kernel, dtype, hid):
    gen = torch.Generator().manual_seed(hid)
    x = torch.randn(9, hid + 3, generator=gen).to(dtype)[:, :hid]  # strided rows
    res = torch.randn(9, hid, generator=gen).to(dtype)
    w = torch.randn(hid, generator=gen).to(dtype)

    def reference(h):  # transformers' LlamaRMSNorm
        v = h.float()
        return w * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    torch.testing.assert_close(kernel.rms_norm(x, w, 1e-6), reference(x), **_tol(dtype))
    summed = res + x
    res_in = res.clone()
    out = kernel.rms_norm(x, w, 1e-6, residual=res_in)
    assert torch.equal(res_in, summed), "the residual add must round like torch's"
    torch.testing.assert_close(out, reference(summed), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 6])
def test_rotary_in_place_on_the_first_heads(kernel, dtype, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    n, heads, extra = 5, 4, 2
    qkv = torch.randn(n, (heads + extra) * head_dim, generator=gen).to(dtype)
    cos = torch.randn(n, head_dim, generator=gen).to(dtype)
    sin = torch.randn(n, head_dim, generator=gen).to(dtype)
    x = qkv.view(n, heads + extra, head_dim)[:, :heads]
    half = head_dim // 2
    expected = x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None]
    untouched = qkv.view(n, heads + extra, head_dim)[:, heads:].clone()
    kernel.rotary(qkv, heads, head_dim, cos, sin)
    torch.testing.assert_close(qkv.view(n, heads + extra, head_dim)[:, :heads], expected, **_tol(dtype))
    assert torch.equal(qkv.view(n, heads + extra, head_dim)[:, heads:], untouched)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("inter", [1536, 37])
def test_silu_mul(kernel, dtype, inter):
    gu = (torch.randn(6, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 4).to(dtype)
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp overflow / underflow
    expected = F.silu(gu[:, :inter]) * gu[:, inter:]
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else _tol(dtype)
    torch.testing.assert_close(kernel.silu_mul(gu, inter), expected, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_store_kv_writes_only_the_slots(kernel, dtype):
    kvh, n, d, slots_total = 3, 5, 8, 40
    qkv = torch.randn(n, (4 + 2 * kvh) * d).to(dtype)  # keys and values as strided views, as in the engine
    key = qkv[:, 4 * d : (4 + kvh) * d].view(n, kvh, d).transpose(0, 1)
    value = qkv[:, (4 + kvh) * d :].view(n, kvh, d).transpose(0, 1)
    k_cache, v_cache = torch.randn(kvh, slots_total, d).to(dtype), torch.randn(kvh, slots_total, d).to(dtype)
    slots = torch.tensor([7, 0, 39, 12, 13])
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    k_expected[:, slots], v_expected[:, slots] = key, value
    kernel.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_argmax_matches_torch_ties_nan_and_tails(kernel, dtype):
    x = torch.randn(12, 1003, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[0, 100] = x[0, 900] = 50  # tie: the first one
    x[1, 7] = x[1, 9] = float("nan")  # NaN: the first NaN
    x[2] = float("-inf")
    x[3, 1002] = 80  # in the vector tail
    x[4, 17] = x[4, 1001] = 60
    assert torch.equal(kernel.argmax(x), x.argmax(-1))
    wide = torch.randn(4, 2100).to(dtype)[:, 50:2050]  # strided rows
    assert torch.equal(kernel.argmax(wide), wide.argmax(-1))
