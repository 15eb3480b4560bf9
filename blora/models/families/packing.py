"""Load-time weight transforms of the fast forwards: fused projections and oneDNN-prepacked GEMM weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blora.models.quant import QuantizedLinear

logger = logging.getLogger("blora")


class Packed:
    """oneDNN weights prepacked for small batches (``torch.ops.mkldnn._reorder_linear_weight``).

    ``F.linear`` hands oneDNN a plain [out, in] weight, which it re-lays out into its blocked format on
    every call; a decode GEMM (32 rows) then costs about twice what the arithmetic needs. Measured here on
    a [32, 576] x [576, 3072] layer streamed from memory (30 layers): bfloat16 411 -> 207 us (same bits),
    float32 1245 -> 366 us (float32 results, another summation order); large prefill GEMMs gain ~10%.
    Turned off by ``EngineConfig(packed_weights=False)``; skipped when a second copy of the weights would
    take more than half of the available memory."""

    BATCH_HINT = 32

    @classmethod
    def worth_it(cls, nbytes: int) -> bool:
        available = available_memory()
        if available is not None and nbytes > available // 2:
            logger.info(
                "blora: not prepacking %.1f GB of weights (%.1f GB available)", nbytes / 1e9, available / 1e9
            )
            return False
        return True

    @classmethod
    def of(cls, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), cls.BATCH_HINT)

    @staticmethod
    def linear(
        x: torch.Tensor, packed: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if packed is None:
            return F.linear(x, weight, bias)
        return Packed.matmul(x, packed, bias)

    @staticmethod
    def matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [N, in] times a prepacked weight (``Packed.of``) -> [N, out] (+ ``bias``)."""
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Gemm:
    """One projection's GEMM as the fast forwards call it, ``gemm(x [N, in]) -> [N, out]``: a float
    ``weight`` [out, in] (and ``bias``) with its oneDNN-prepacked copy ``packed`` once ``FastDecoder.pack``
    made one, or a ``QuantizedLinear`` (``quant``: its own integer kernel, never prepacked; ``weight`` is then
    its packed integer weight, not read here). Which one is fixed when built; a float call is
    ``Packed.linear``."""

    __slots__ = ("weight", "bias", "packed", "quant")

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantizedLinear | None = None
    ) -> None:
        self.weight, self.bias, self.quant = weight, bias, quant
        self.packed: torch.Tensor | None = None

    @classmethod
    def quantized(cls, quant: QuantizedLinear) -> Gemm:
        return cls(quant.qweight, None, quant)

    @property
    def out_features(self) -> int:
        return self.quant.out_features if self.quant is not None else self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.forward(x)
        return Packed.linear(x, self.packed, self.weight, self.bias)


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the layers' weights (and biases) once; each layer's own parameters become views of it
    (no extra memory; transformers' modules and the LoRA wrappers keep working on them)."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat(
            [m.bias.detach() if m.bias is not None else weight.new_zeros(m.weight.shape[0]) for m in linears]
        )
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start : start + rows]
        if m.bias is not None and bias is not None:
            m.bias.data = bias[start : start + rows]
        start += rows
    return weight, bias
