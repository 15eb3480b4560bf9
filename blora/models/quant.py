"""Weight-only quantized base linears (int8 per output channel, int4 in groups) that LoRA adapters wrap.

``quantize_model(model, "int8" | "int4")`` replaces every ``nn.Linear`` (and GPT-2 ``Conv1D``) of the model
by a ``QuantizedLinear``: the weights are stored as integers plus scales, activations stay in floating
point, and ``LoraLinear`` wraps the quantized module like any linear, adding its adapters' terms in the
model's dtype (the adapters themselves are never quantized). The LM head is quantized to int8 with one scale
per vocabulary row whatever the method; when it is tied to the input embeddings, those become a
``QuantizedEmbedding`` over the SAME int8 table (its lookup is exactly the dequantized rows), so the
[vocab, hidden] table is held once in int8 instead of in the model's dtype (SmolLM2-135M: 28M of its 135M
weights). ``dequantize_model`` turns all of them back into plain, tied modules (the reference PEFT runs on).
The model families' own forwards (``blora.models.families``) run quantized models as well, q/k/v and gate/up
as one kernel call each over a fused layer (``fuse_quantized``).

Kernels: int8 layers run blora's own kernel (``blora.kernels``, ``CpuKernel.int8_linear``) over the weight
stored in blocks of 16 output rows (``to_blocks``: for each input column the 16 rows' values side by side),
which streams the weights in order and yields 16 outputs per vector with no horizontal sum; each bfloat16
activation times int8 weight product is exact in float32, the float32 sum is scaled once per output.
Measured on a 2-core AMD EPYC with AVX512-BF16 (2 threads, weights streamed from memory): at one row
1.2-1.7x faster than ``torch._weight_int8pack_mm`` over [out, in] rows, and faster at every batch size
up to 512 rows; a whole decode step at one request went from 1.32x to 1.74x the bfloat16 model's tok/s on
SmolLM2-135M and from 1.22x to 2.04x at the Qwen2.5-0.5B shape. From 128 rows (prefill chunks) the
layer dequantizes its blocks to bfloat16 in C++ and runs oneDNN's GEMM instead (1.4-2x faster there).
Layers whose output size is not a multiple of 16, engines with ``cpu_kernel=False`` and CPUs without
AVX-512 (or without a compiler) keep [out, in] rows and PyTorch's kernel.
int4 layers run ``torch._weight_int4pack_mm_for_cpu`` (int4 weight in groups along the input, a scale and
zero per group). Both PyTorch kernels are called with bfloat16 activations (with float32 activations they
take a scalar path, 10-20x slower), and blora's reads bfloat16 too: float32 models' activations are rounded
to bfloat16 on the way in and the output converted back. At many rows (prefill, 32 concurrent requests)
oneDNN's native bfloat16 GEMM outruns every integer kernel on this CPU, which converts each weight to
float before multiplying (the fast forward runs the LM head from a prepacked copy of its dequantized weight
there, ``FastDecoder.logits``). torchao was measured too: its int8 weight-only tensor on CPU converts the
int8 weight to float on every call and its CPU int4 layout calls the same ``_weight_int4pack_mm_for_cpu``
through a tensor subclass, so it adds a dependency without a faster kernel.
"""

from __future__ import annotations

import functools
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
INT8_IN_MULTIPLE = 8  # PyTorch's int8 kernel reads inputs in blocks of 8 columns
# Output rows per block of the blocked int8 layout that blora's own kernel reads (``blora.kernels``,
# ``CpuKernel.int8_linear``): qweight [out/16, in, 16]; layers whose out_features is not a multiple keep [out, in].
INT8_BLOCK = 16
# Rows from which a blocked int8 layer dequantizes its weight to bfloat16 (C++, ``CpuKernel.int8_dequantize``)
# and runs oneDNN's GEMM instead of the int8 kernel, which is compute-bound there (it converts every weight
# once per 4 rows). Measured, 2 threads, 896 -> 9728: 3.00 / 6.06 / 25.3 ms (kernel) against 2.93 / 4.34 /
# 12.9 ms at 64 / 128 / 512 rows; 4864 -> 896: 1.70 / 3.48 / 14.7 against 1.67 / 3.19 / 7.9 ms.
INT8_GEMM_ROWS = 128
INT4_OUT_MULTIPLE = 32  # the int4 packing stores outputs in blocks of 32 rows (``_int4_values`` reads them)
# The LM head (and input embeddings tied to it) in every method: one int8 row per token serves the head's
# kernel and an exact embedding lookup; an int4 table would need the kernel's packing undone per lookup.
HEAD_METHOD = "int8"


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
    int8: ``W = q * scale[:, None]`` with ``q`` int8 [out, in], ``scale`` [out]; ``qweight`` holds ``q`` in
    blocks of 16 rows, [out/16, in, 16], when ``blocked`` (blora's kernel; ``int8_rows`` gives [out, in]).
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
        blocked: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size, self.dtype = method, group_size, dtype
        self.blocked = blocked  # int8 in blocks of INT8_BLOCK rows, for blora's kernel
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)  # int8: [out]; int4: [in/G, out, 2] (scale, zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def from_linear(
        cls, linear: LinearLike, method: str, name: str = "", kernel: bool = True
    ) -> QuantizedLinear:
        """Quantize the weight of ``linear`` (an ``nn.Linear`` or GPT-2's ``Conv1D``) by rounding to nearest;
        ``name`` labels the layer in errors. ``kernel``: int8 layers whose rows fit the blocked layout run
        blora's kernel where it is built (else PyTorch's)."""
        conv1d = type(linear).__name__ == "Conv1D"  # GPT-2's linear, weight [in, out]
        w = linear.weight.detach().float()
        w = w.t() if conv1d else w
        out_f, in_f = w.shape
        check_shape(name or "linear", in_f, out_f, method)
        blocked = False
        if method == "int8":
            qweight, scales, group = *_quantize_int8(w), None
            if kernel and out_f % INT8_BLOCK == 0 and _vector_kernel():
                qweight, blocked = to_blocks(qweight), True
        else:
            qweight, scales, group = *_quantize_int4(w, INT4_GROUP_SIZE), INT4_GROUP_SIZE
        return cls(in_f, out_f, method, qweight, scales, linear.bias, linear.weight.dtype, group, blocked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == KERNEL_DTYPE == self.dtype and self.bias is None:
            return self._kernel(x)  # a bfloat16 model's [N, in] rows: no reshape or cast (~6 us of 15 a call)
        shape = x.shape
        y = self._kernel(x.reshape(-1, self.in_features).to(KERNEL_DTYPE)).to(self.dtype)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features)

    def _kernel(self, flat: torch.Tensor) -> torch.Tensor:
        """[N, in] in ``KERNEL_DTYPE`` -> [N, out] in ``KERNEL_DTYPE``."""
        if self.blocked and (kernel := _kernel()) is not None:
            if flat.shape[0] >= INT8_GEMM_ROWS:  # a prefill chunk
                return nn.functional.linear(flat, kernel.int8_dequantize(self.qweight, self.scales))
            return kernel.int8_linear(
                flat if flat.stride(1) == 1 else flat.contiguous(), self.qweight, self.scales
            )
        if self.method == "int8":
            return torch._weight_int8pack_mm(flat, self.int8_rows(), self.scales)
        assert self.group_size is not None  # int4 always has its group size
        return torch._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the kernel computes with, [out, in] (a new tensor; for checks and DoRA norms)."""
        if self.method == "int8":
            w = self.int8_rows().float() * self.scales.float()[:, None]
        else:
            assert self.group_size is not None
            w = _dequantize_int4(self._int4_values(), self.scales, self.group_size)
        return w.to(dtype or self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized copy of the weight [out, in] in the model's dtype: code that reads a linear's
        weight (DoRA norms, dtype / device checks) sees what the kernel multiplies by. Allocates."""
        return self.dequantize()

    def int8_rows(self) -> torch.Tensor:
        """The int8 weight as [out, in] rows (a copy when it is stored in blocks)."""
        return int8_rows(self.qweight, self.blocked)

    def _int4_values(self) -> torch.Tensor:
        """The 0..15 values [out, in] (as float) of the packed weight (``_unpack_int4``)."""
        return _unpack_int4(self.qweight, self.out_features, self.in_features).float()

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        group += f", blocks of {INT8_BLOCK} rows" if self.blocked else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.method}{group}, "
            f"bias={self.bias is not None}"
        )


class QuantizedEmbedding(nn.Embedding):
    """Token embeddings read from an int8 table with one scale per row: ``y = dequantize(W)[ids]``, exactly
    the dequantized rows (``q[ids] * scale[ids]`` in float32, then the model's dtype).

    ``ids`` [...] -> [..., embedding_dim]. Made for input embeddings tied to the LM head (``tied_to``): the
    head's int8 ``QuantizedLinear`` and this module hold the SAME ``qweight`` [vocab, dim] and ``scales``
    [vocab], as llama.cpp's Q8_0 token embeddings serve both lookups. A subclass of ``nn.Embedding`` so
    that code asking for an embedding (the LoRA wrappers, ``get_input_embeddings``) gets one; it has no
    ``weight`` parameter: ``weight`` is a dequantized copy (allocates; for checks).
    """

    qweight: torch.Tensor  # buffers (registered in __init__)
    scales: torch.Tensor

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        dtype: torch.dtype,
        padding_idx: int | None = None,
        blocked: bool = False,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Embedding's: it would allocate a float weight
        self.num_embeddings, self.embedding_dim = scales.shape[0], qweight.shape[1]
        self.blocked = blocked  # the head's blocked layout: qweight [vocab/16, dim, 16]
        self.padding_idx, self.max_norm, self.norm_type = padding_idx, None, 2.0
        self.scale_grad_by_freq, self.sparse, self.dtype = False, False, dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def tied_to(cls, head: QuantizedLinear, padding_idx: int | None = None) -> QuantizedEmbedding:
        """The embeddings over ``head``'s int8 table (an int8 ``QuantizedLinear`` [vocab, dim]; shared)."""
        assert head.method == "int8" and head.bias is None
        return cls(head.qweight, head.scales, head.dtype, padding_idx, head.blocked)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.qweight[ids // INT8_BLOCK, :, ids % INT8_BLOCK] if self.blocked else self.qweight[ids]
        return (q.float() * self.scales[ids].float()[..., None]).to(self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The table [vocab, dim] the lookups read (a new tensor)."""
        return (int8_rows(self.qweight, self.blocked).float() * self.scales.float()[:, None]).to(
            dtype or self.dtype
        )

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]  # nn.Embedding's is a parameter
        return self.dequantize()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 (rows scaled)"


def fuse_quantized(parts: list[QuantizedLinear]) -> QuantizedLinear | str:
    """One ``QuantizedLinear`` whose output is the parts' outputs concatenated (q/k/v, gate/up), for ONE
    kernel call over all of them; or a string saying why these parts cannot be fused. A single part is
    returned as it is.

    Exact, not re-quantized: every int8 row has its own scale, every int4 value, scale and zero belongs to
    one output row and input group, so the fused layer holds the parts' values and scales side by side.
    Memory, as ``fuse_linears`` does for float weights, the parts' buffers become views of the fused ones
    where the layout allows:

    - int8: ``qweight`` [out, in] and ``scales`` [out] concatenate along the rows: views, no extra memory.
    - int4 ``qweight``: the values are re-packed over the fused rows (``_convert_weight_to_int4pack_for_cpu``
      stores blocks of rows: 64 with AVX-512, a 32-row tail laid out differently; 32 on AVX2); a part whose
      bytes are a slice of the fused ones (whole blocks, or the last part) becomes a view of it, another keeps its own copy (0.5 byte per weight;
      Llama-style models with head_dim 64 or 128 have none, the tiny test models do).
    - int4 ``scales`` [in/G, out, 2] interleave the parts along dim 1 and the kernel reads them as contiguous
      (a strided view computes wrong values): the fused layer holds a copy, 4 bytes per 32 weights, i.e.
      +20% on the fused projections' int4 bytes (0.5 + 0.125 byte per weight -> 0.75).
    """
    first = parts[0]
    kinds = {(p.method, p.group_size, p.in_features, p.dtype, p.qweight.device, p.blocked) for p in parts}
    if len(kinds) > 1:
        return "its parts differ in quantization method, group size, input size, dtype, device or layout"
    if len(parts) == 1:
        return first
    if first.method == "int8":
        qweight = torch.cat([p.qweight for p in parts])
        scales = torch.cat([p.scales for p in parts])
    else:
        values = torch.cat([_unpack_int4(p.qweight, p.out_features, p.in_features) for p in parts])
        qweight = torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)
        scales = torch.cat([p.scales for p in parts], dim=1)  # [in/G, out, 2]: a copy (see above)
    bias = None
    if any(p.bias is not None for p in parts):
        zeros = [torch.zeros(p.out_features, dtype=p.dtype, device=p.qweight.device) for p in parts]
        bias = torch.cat(
            [p.bias.detach() if p.bias is not None else z for p, z in zip(parts, zeros, strict=True)]
        )
    out_features = sum(p.out_features for p in parts)
    fused = QuantizedLinear(
        first.in_features, out_features, first.method, qweight, scales, bias, first.dtype, first.group_size,
        first.blocked,
    )  # fmt: skip
    start = 0
    for p in parts:
        stop = start + p.out_features
        # int8 [rows, in] or whole blocks [rows/16, in, 16] (a blocked part's rows are a multiple of 16);
        # int4 [rows, in/2] bytes
        block = INT8_BLOCK if first.blocked else 1
        rows = qweight[start // block : stop // block]
        if first.method == "int8" or torch.equal(rows, p.qweight):
            p.qweight = rows
        if first.method == "int8":
            p.scales = scales[start:stop]
        if p.bias is not None and fused.bias is not None:
            p.bias.data = fused.bias.data[start:stop]
        start = stop
    return fused


def fused_extra_bytes(fused: QuantizedLinear, parts: list[QuantizedLinear]) -> int:
    """Bytes ``fused`` holds that are not shared with ``parts`` (int4 scales, int4 rows not viewed)."""
    base = fused.qweight.untyped_storage().data_ptr()
    own = [p.qweight for p in parts if p.qweight.untyped_storage().data_ptr() != base]
    extra = sum(t.numel() * t.element_size() for t in own)
    if fused.method == "int4":
        extra += fused.scales.numel() * fused.scales.element_size()
    return extra


def to_blocks(q: torch.Tensor) -> torch.Tensor:
    """int8 rows [out, in] -> blocks [out/16, in, 16] (``INT8_BLOCK`` rows side by side per input column)."""
    out_f, in_f = q.shape
    return q.view(out_f // INT8_BLOCK, INT8_BLOCK, in_f).transpose(1, 2).contiguous()


def from_blocks(qb: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_blocks``: [out/16, in, 16] -> [out, in] (a copy)."""
    blocks, in_f, width = qb.shape
    return qb.transpose(1, 2).reshape(blocks * width, in_f)


def int8_rows(qweight: torch.Tensor, blocked: bool) -> torch.Tensor:
    """An int8 table as [out, in] rows, whichever layout it is stored in (a copy when blocked)."""
    return from_blocks(qweight) if blocked else qweight


_KERNEL: list = []  # [blora.kernels.CpuKernel | None] once looked up: read on every int8 layer call


def _kernel():  # blora.kernels.CpuKernel | None (imported here: the kernels build on first use)
    if not _KERNEL:
        from blora import kernels

        _KERNEL.append(kernels.get())
    return _KERNEL[0]


def _vector_kernel() -> bool:
    """Whether the kernel was built with its AVX-512 path, the one measured faster than PyTorch's (its
    portable path is checked for correctness, not speed: other CPUs keep PyTorch's kernel)."""
    kernel = _kernel()
    return kernel is not None and kernel.native_vector


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


# How ``torch._convert_weight_to_int4pack_for_cpu`` lays out [out, in] values 0..15 in its [out, in/2] bytes:
# blocks of ``block`` output rows, each [in, block/2] bytes, then a last block of ``tail`` rows when ``out`` is
# not a multiple of ``block``; in a block, byte ``j`` of an input column holds two rows, either ``j`` and
# ``block/2 + j`` ("halves") or ``2j`` and ``2j + 1`` ("pairs"), in its low and high nibble. The layout
# depends on the CPU PyTorch runs on (the same 2.13 build packs 64-row blocks with AVX-512 and 32-row ones
# on an AVX2 machine); ``_int4_layout`` finds which one is in use (the packing op has no inverse to call).
Int4Layout = tuple[int, bool, int, bool]  # (block rows, pairs?, tail rows, tail pairs?)
INT4_LAYOUTS: tuple[Int4Layout, ...] = (
    (64, False, 32, True),  # AVX-512: blocks of 64 rows as halves, a 32-row tail as pairs
    (32, False, 32, False),  # AVX2: blocks of 32 rows as halves
)


@functools.cache
def _int4_layout() -> Int4Layout:
    """The layout of ``INT4_LAYOUTS`` this PyTorch packs with on this CPU, checked once on random values of
    160 x 64 (full blocks and a tail in both layouts); ``QuantizationError`` when none matches."""
    values = torch.randint(0, 16, (160, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(values, 1)
    for layout in INT4_LAYOUTS:
        if torch.equal(_unpack_int4(packed, 160, 64, layout), values.to(torch.uint8)):
            return layout
    raise QuantizationError(
        f"this PyTorch ({torch.__version__}) packs int4 weights in a layout blora does not read; "
        "use quantization='int8'"
    )


def _unpack_int4(
    packed: torch.Tensor, out_f: int, in_f: int, layout: Int4Layout | None = None
) -> torch.Tensor:
    """The values 0..15 [out, in] (uint8) of ``packed`` [out, in/2] (``_convert_weight_to_int4pack_for_cpu``)."""
    block, pairs, tail, tail_pairs = layout or _int4_layout()
    flat = packed.reshape(-1)
    rows, start = [], 0
    while start < out_f:
        size, interleave = (block, pairs) if out_f - start >= block else (tail, tail_pairs)
        part = flat[start * in_f // 2 : (start + size) * in_f // 2].view(in_f, size // 2)
        lo, hi = part & 15, part >> 4
        values = (
            torch.stack([lo, hi], dim=2).reshape(in_f, size) if interleave else torch.cat([lo, hi], dim=1)
        )
        rows.append(values.t())
        start += size
    return torch.cat(rows)


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
    _int4_layout()  # refuse a PyTorch whose packing ``dequantize`` cannot read, before packing anything
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(out_f, in_f), 1)
    scales = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
    return packed, scales


def _dequantize_int4(q: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    out_f, in_f = q.shape
    scale = scales[..., 0].float().t()[..., None]  # [out, in/G, 1]
    zero = scales[..., 1].float().t()[..., None]
    return ((q.reshape(out_f, in_f // group, group) - 8) * scale + zero).reshape(out_f, in_f)


def quantize_model(model: nn.Module, method: str, kernel: bool = True) -> int:
    """Replace every ``nn.Linear`` / ``Conv1D`` of ``model`` by a ``QuantizedLinear`` (in place); returns how
    many were replaced. The decoder's linears take ``method``; the LM head takes int8 whatever ``method``
    (``_head_plan``: and, when it is tied to the input embeddings, they become a ``QuantizedEmbedding`` over
    the same int8 table). Checks every layer's shape before changing any. A model already quantized with
    ``method`` is left as it is. ``kernel=False``: int8 layers run PyTorch's kernel, not blora's."""
    if method not in QUANTIZATION_METHODS:
        raise QuantizationError(
            f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or None), got {method!r}"
        )
    get_head = getattr(model, "get_output_embeddings", None)  # transformers' models have it
    head = get_head() if get_head is not None else None
    done = {m.method for m in model.modules() if isinstance(m, QuantizedLinear) and m is not head}
    if done:
        if done != {method}:
            raise QuantizationError(
                f"the model is already quantized ({', '.join(sorted(done))}); load it again to use {method}"
            )
        return 0
    targets = [(n, m) for n, m in model.named_modules() if _quantizable(m) and m is not head]
    for name, linear in targets:
        if linear.weight.device.type != "cpu":
            raise QuantizationError(
                f"{name}: quantization runs on CPU only (the weight is on {linear.weight.device}); "
                "load the model with device='cpu' or serve it unquantized"
            )
        out_f, in_f = linear.weight.shape
        check_shape(name, *((out_f, in_f) if type(linear).__name__ == "Conv1D" else (in_f, out_f)), method)
    plan = _head_plan(model, head)
    with torch.no_grad():
        for name, linear in targets:
            _replace(model, name, QuantizedLinear.from_linear(linear, method, name, kernel))
        if isinstance(plan, str):
            logger.info("blora: %d linear layers quantized to %s; LM head kept as it is: %s",
                        len(targets), method, plan)  # fmt: skip
            return len(targets)
        head_name, embed_name = plan
        assert head is not None and _quantizable(head)  # _head_plan checked it
        quant_head = QuantizedLinear.from_linear(head, HEAD_METHOD, head_name, kernel)
        _replace(model, head_name, quant_head)
        if embed_name is not None:
            embed = model.get_submodule(embed_name)
            assert isinstance(embed, nn.Embedding)  # _head_plan checked it
            _replace(model, embed_name, QuantizedEmbedding.tied_to(quant_head, embed.padding_idx))
    logger.info("blora: %d linear layers quantized to %s, LM head to %s%s", len(targets), method, HEAD_METHOD,
                " (one table with the tied input embeddings)" if embed_name else "")  # fmt: skip
    return len(targets) + 1


def _head_plan(model: nn.Module, head: nn.Module | None) -> tuple[str, str | None] | str:
    """(LM head name, name of the input embeddings tied to it or None) to quantize, or why the head stays as
    it is. A tied head is quantized only with its embeddings (one int8 table for both: a separate int8 head
    would add memory next to the float embeddings)."""
    if head is None:
        return "the model has no output embeddings"
    if type(head) is not nn.Linear:
        return f"it is a {type(head).__name__}, not an nn.Linear"
    if head.weight.device.type != "cpu":
        return f"its weight is on {head.weight.device}"
    if head.in_features % INT8_IN_MULTIPLE:
        return f"in_features={head.in_features} is not a multiple of {INT8_IN_MULTIPLE}"
    names = {id(m): n for n, m in model.named_modules()}
    head_name = names.get(id(head))
    if head_name is None:
        return "it is not a submodule of the model"
    get_embed = getattr(model, "get_input_embeddings", None)
    embed = get_embed() if get_embed is not None else None
    if embed is None or embed.weight.untyped_storage().data_ptr() != head.weight.untyped_storage().data_ptr():
        return head_name, None  # not tied: the head alone
    if (
        type(embed) is not nn.Embedding
        or embed.max_norm is not None
        or embed.weight.shape != head.weight.shape
    ):
        return f"it is tied to a {type(embed).__name__} that quantization does not replace"
    embed_name = names.get(id(embed))
    if embed_name is None:
        return "its tied input embeddings are not a submodule of the model"
    return head_name, embed_name


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _quantizable(module: nn.Module) -> TypeGuard[LinearLike]:
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D"


def dequantize_model(model: nn.Module) -> int:
    """Turn every ``QuantizedLinear`` of ``model`` back into an ``nn.Linear`` holding its dequantized weight,
    and every ``QuantizedEmbedding`` into an ``nn.Embedding`` (in place; returns how many): the model that
    PEFT or transformers can run as the quantized model's reference. A head and embeddings that shared one
    int8 table share one dequantized weight again (tied, as before quantization)."""
    tables: dict[int, nn.Embedding] = {}  # int8 table storage -> the restored embeddings
    embeds = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedEmbedding)]
    for name, e in embeds:
        embedding = nn.Embedding(e.num_embeddings, e.embedding_dim, e.padding_idx, dtype=e.dtype)
        with torch.no_grad():
            embedding.weight.copy_(e.dequantize())
        tables[e.qweight.untyped_storage().data_ptr()] = embedding
        _replace(model, name, embedding)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, q in targets:
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=q.dtype)
        tied = tables.get(q.qweight.untyped_storage().data_ptr())
        with torch.no_grad():
            if tied is not None and tied.weight.shape == (q.out_features, q.in_features):
                linear.weight = tied.weight
            else:
                linear.weight.copy_(q.dequantize())
            if q.bias is not None:
                linear.bias.copy_(q.bias)
        _replace(model, name, linear)
    return len(targets) + len(embeds)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())
