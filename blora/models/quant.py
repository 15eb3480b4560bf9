"""Weight-only quantized base linears (int8 per output channel, int4 in groups) that LoRA adapters wrap.

``quantize_model(model, "int8" | "int4")`` replaces every ``nn.Linear`` (and GPT-2 ``Conv1D``) of the model
except its LM head by a ``QuantizedLinear``: the weights are stored as integers plus scales, activations stay
in floating point, and ``LoraLinear`` wraps the quantized module like any linear, adding its adapters' terms in the model's dtype
(the adapters themselves are never quantized). The LM head is left as it is: it is often tied to the
input embeddings, which are not linears.

Kernels: PyTorch's own packed matmuls, ``torch._weight_int8pack_mm`` (int8 weight, per-row scale) and
``torch._weight_int4pack_mm_for_cpu`` (int4 weight in groups along the input, a scale and zero per group),
called with bfloat16 activations. Measured with ``benchmarks/quant_bench.py ops`` on a 2-core AVX2 CPU
(SmolLM2-135M shapes): with float32 activations both ops take a scalar path, 10-20x slower than a float32
``F.linear``; with bfloat16 activations int8 runs at 0.4-0.9x of float32 ``F.linear`` and 4-7x faster than
bfloat16 ``F.linear`` (which this CPU emulates), int4 at 0.1-1.1x (slow at one row). torchao was measured
too: its int8 weight-only tensor on CPU converts the int8 weight to float on every call (0.1x of float32 at
one row) and its CPU int4 layout calls the same ``_weight_int4pack_mm_for_cpu`` through a tensor subclass,
so it adds a dependency without a faster kernel.
"""

from __future__ import annotations

import logging
from typing import Protocol, TypeGuard

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("int8", "int4")
# Input columns per int4 scale/zero: the block of GGUF's Q4_0 / Q4_1, so a model dequantized from such a file
# (the embedded default is Q4_1) is re-quantized onto nearly the same grid (measured on SmolLM2: logits within
# 4.4% of the float32 model with 32, 58% with 64).
INT4_GROUP_SIZE = 32
KERNEL_DTYPE = torch.bfloat16  # activations enter the integer kernels in this dtype (see the module doc)
INT8_IN_MULTIPLE = 8  # the int8 kernel reads inputs in blocks of 8 columns
INT4_OUT_MULTIPLE = 32  # the int4 packing stores outputs in blocks of 32 rows (``_int4_values`` reads them)


class LinearLike(Protocol):
    """What quantization reads of a layer: ``nn.Linear`` (weight [out, in]) or GPT-2's ``Conv1D`` (weight
    [in, out])."""

    weight: torch.Tensor
    bias: torch.Tensor | None


class QuantizationError(ValueError):
    """A model cannot be quantized as asked; the message names the layer and what to do."""


class QuantizedLinear(nn.Module):
    """Weight-only quantized drop-in for ``nn.Linear``: ``y = x @ dequantize(W).T + b``.

    ``x`` [..., in_features] in the model's dtype -> ``y`` [..., out_features] in the same dtype.
    int8: ``W = q * scale[:, None]`` with ``q`` int8 [out, in], ``scale`` [out].
    int4: ``W[:, g*G:(g+1)*G] = (q[:, g*G:(g+1)*G] - 8) * scale[g] + zero[g]`` with ``q`` in 0..15 packed two
    per byte, ``scale`` / ``zero`` [in/G, out] for groups of ``G = group_size`` input columns.
    Semantics: ``torch.nn.functional.linear(x, self.dequantize(), self.bias)`` (activations and outputs are
    rounded to bfloat16 inside the kernel).
    """

    qweight: torch.Tensor  # buffers (registered in __init__)
    scales: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        method: str,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size, self.dtype = method, group_size, dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)  # int8: [out]; int4: [in/G, out, 2] (scale, zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: LinearLike, method: str, name: str = "") -> QuantizedLinear:
        """Quantize the weight of ``linear`` (an ``nn.Linear`` or GPT-2's ``Conv1D``) by rounding to nearest;
        ``name`` labels the layer in errors."""
        conv1d = type(linear).__name__ == "Conv1D"  # GPT-2's linear, weight [in, out]
        w = linear.weight.detach().float()
        w = w.t() if conv1d else w
        out_f, in_f = w.shape
        check_shape(name or "linear", in_f, out_f, method)
        if method == "int8":
            qweight, scales, group = *_quantize_int8(w), None
        else:
            qweight, scales, group = *_quantize_int4(w, INT4_GROUP_SIZE), INT4_GROUP_SIZE
        return cls(in_f, out_f, method, qweight, scales, linear.bias, linear.weight.dtype, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        if self.method == "int8":
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:
            assert self.group_size is not None  # int4 always has its group size
            y = torch._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales)
        y = y.to(self.dtype)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the kernel computes with, [out, in] (a new tensor; for checks and DoRA norms)."""
        if self.method == "int8":
            w = self.qweight.float() * self.scales.float()[:, None]
        else:
            assert self.group_size is not None
            w = _dequantize_int4(self._int4_values(), self.scales, self.group_size)
        return w.to(dtype or self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized copy of the weight [out, in] in the model's dtype: code that reads a linear's
        weight (DoRA norms, dtype / device checks) sees what the kernel multiplies by. Allocates."""
        return self.dequantize()

    def _int4_values(self) -> torch.Tensor:
        """The 0..15 values [out, in]. The CPU packing stores blocks of 32 output rows as [in, 16] bytes,
        byte ``i`` holding row ``i`` (low nibble) and row ``16 + i`` (high nibble) of the block."""
        blocks = self.qweight.reshape(self.out_features // 32, self.in_features, 16)
        values = torch.cat([blocks & 15, blocks >> 4], dim=2)  # [out/32, in, 32]
        return values.transpose(1, 2).reshape(self.out_features, self.in_features).float()

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.method}{group}, "
            f"bias={self.bias is not None}"
        )


def check_shape(name: str, in_features: int, out_features: int, method: str) -> None:
    """Raise ``QuantizationError`` when the kernels cannot take a layer of this shape."""
    if method == "int8" and in_features % INT8_IN_MULTIPLE:
        raise QuantizationError(
            f"{name}: in_features={in_features} is not a multiple of {INT8_IN_MULTIPLE}, which the int8 "
            "kernel needs; serve this model without quantization"
        )
    if method == "int4" and (in_features % INT4_GROUP_SIZE or out_features % INT4_OUT_MULTIPLE):
        raise QuantizationError(
            f"{name}: {in_features} -> {out_features} does not fit int4 (in_features must be a multiple of "
            f"the group size {INT4_GROUP_SIZE}, out_features of {INT4_OUT_MULTIPLE}); use "
            "quantization='int8' for this model"
        )


def _quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8. The scales are rounded to the kernel's dtype first, so that
    ``q * scale`` is exactly the weight the kernel uses."""
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(KERNEL_DTYPE)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def _quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of ``group`` input columns (min/max per group), packed for the CPU kernel.
    Scales and zeros are rounded to the kernel's dtype before the values are picked."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-6).to(KERNEL_DTYPE).float()
    zero = (low + 8 * scale).to(KERNEL_DTYPE).float()  # the kernel's w = (q - 8) * scale + zero
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(out_f, in_f), 1)
    scales = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
    return packed, scales


def _dequantize_int4(q: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    out_f, in_f = q.shape
    scale = scales[..., 0].float().t()[..., None]  # [out, in/G, 1]
    zero = scales[..., 1].float().t()[..., None]
    return ((q.reshape(out_f, in_f // group, group) - 8) * scale + zero).reshape(out_f, in_f)


def quantize_model(model: nn.Module, method: str) -> int:
    """Replace every ``nn.Linear`` / ``Conv1D`` of ``model`` except its LM head by a ``QuantizedLinear`` (in place);
    returns how many were replaced. Checks every layer's shape before changing any. A model already
    quantized with ``method`` is left as it is."""
    if method not in QUANTIZATION_METHODS:
        raise QuantizationError(
            f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or None), got {method!r}"
        )
    done = {m.method for m in model.modules() if isinstance(m, QuantizedLinear)}
    if done:
        if done != {method}:
            raise QuantizationError(
                f"the model is already quantized ({', '.join(sorted(done))}); load it again to use {method}"
            )
        return 0
    get_head = getattr(model, "get_output_embeddings", None)  # transformers' models have it
    head = get_head() if get_head is not None else None
    targets = [(n, m) for n, m in model.named_modules() if _quantizable(m) and m is not head]
    for name, linear in targets:
        if linear.weight.device.type != "cpu":
            raise QuantizationError(
                f"{name}: quantization runs on CPU only (the weight is on {linear.weight.device}); "
                "load the model with device='cpu' or serve it unquantized"
            )
        out_f, in_f = linear.weight.shape
        check_shape(name, *((out_f, in_f) if type(linear).__name__ == "Conv1D" else (in_f, out_f)), method)
    with torch.no_grad():
        for name, linear in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantizedLinear.from_linear(linear, method, name))
    logger.info("blora: %d linear layers quantized to %s (LM head kept in %s)", len(targets), method,
                "its dtype" if head is None else head.weight.dtype)  # fmt: skip
    return len(targets)


def _quantizable(module: nn.Module) -> TypeGuard[LinearLike]:
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D"


def dequantize_model(model: nn.Module) -> int:
    """Turn every ``QuantizedLinear`` of ``model`` back into an ``nn.Linear`` holding its dequantized weight
    (in place; returns how many): the model that PEFT or transformers can run as the quantized model's
    reference."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, q in targets:
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=q.dtype)
        with torch.no_grad():
            linear.weight.copy_(q.dequantize())
            if q.bias is not None:
                linear.bias.copy_(q.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return len(targets)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())
