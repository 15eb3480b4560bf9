"""Triton kernels for the GPU path: multi-LoRA shrink/expand (SGMV and BGMV, fused output slices) and paged
decode attention. Each kernel has a plain-torch reference op beside it (``*_reference``) that defines it.

The kernels also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set before
``triton`` is imported), which is how they are tested without a GPU. ``available()`` says whether a
launch can work for a tensor on ``device``.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with triton installed, or any device's CPU
    tensors under the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available()
    return kind == "cpu" and interpreting()


def precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s input precision: float32 operands are multiplied in IEEE float32 (no TF32 rounding, so
    float32 models match PEFT); half types keep Triton's default (the tensor cores' native products)."""
    return "ieee" if dtype == torch.float32 else None
