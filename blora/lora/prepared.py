"""Turning one module's saved PEFT weights into what a wrapper holds: checked, transposed, scaled.

Everything here reads the base model and never changes it, so it may run in a background thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from blora.lora.config import AdapterError, LoraConfig
from blora.lora.layers import base_dtype_device, base_features
from blora.lora.saved import copy_parameters, is_token_wise
from blora.lora.weights import ModuleLora

_NORM_CHUNK = 8192  # columns per step when computing DoRA's weight norm (bounds the temporary)


@dataclass
class LoraWeights:
    """One module's prepared LoRA.

    ``a`` [in, r], a transposed view of a row-major [r, in] tensor (embedding: [num_embeddings, r]);
    ``b`` [r, out] with the scaling (and DoRA's ``g``) folded in; ``bias`` [out]: LoRA bias (``lora_bias``), scaled likewise; ``dora_scale`` [out]: DoRA's
    ``g = m / ||W + s B A||`` (row norms), which multiplies the base output of the adapter's tokens.
    """

    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.a, self.b, self.bias, self.dora_scale) if t is not None]

    def to(self, device: torch.device) -> LoraWeights:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        bias, dora_scale = self.bias, self.dora_scale
        return LoraWeights(
            move(self.a),
            move(self.b),
            None if bias is None else move(bias),
            None if dora_scale is None else move(dora_scale),
            self.embedding,
        )


@dataclass
class PreparedAdapter:
    """A validated adapter ready to install into a slot: LoRA weights per module and full parameter sets of
    its ``modules_to_save``. Built without touching the model (see ``LoraManager.prepare``)."""

    name: str
    source: str
    modules: dict[str, LoraWeights]
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        tensors = [t for w in self.modules.values() for t in w.tensors()]
        tensors += [t for params in self.saved.values() for t in params.values()]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)

    @property
    def uses_dora(self) -> bool:
        return any(w.dora_scale is not None for w in self.modules.values())


def weight_rows(module: nn.Module) -> torch.Tensor:
    """The base weight as [out, in] rows (PEFT's ``transpose(weight, fan_in_fan_out)``; embedding: [dim, vocab])."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)  # a linear, Conv1D or embedding (QuantizedLinear: dequantized)
    if isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D":
        return weight.t()
    return weight


def dora_norm(w_rows: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms of ``W + scale * B @ A`` in float32, in column chunks. Semantics:
    ``torch.linalg.norm(w_rows + scale * b @ a, dim=1)`` with ``w_rows`` [out, in], ``b`` [out, r], ``a`` [r, in]."""
    device = w_rows.device
    b = b.to(device=device, dtype=torch.float32)
    squares = torch.zeros(w_rows.shape[0], dtype=torch.float32, device=device)
    for i in range(0, w_rows.shape[1], _NORM_CHUNK):
        a_part = a[:, i : i + _NORM_CHUNK].to(device=device, dtype=torch.float32)
        chunk = w_rows[:, i : i + _NORM_CHUNK].float() + scale * (b @ a_part)
        squares += chunk.square().sum(dim=1)
    return squares.sqrt()


def prepare_module(
    key: str,
    name: str,
    module: nn.Module,
    raw: ModuleLora,
    cfg: LoraConfig,
    max_rank: int | None,
    device: torch.device | str | None,
) -> LoraWeights:
    """Check ``raw`` against the base ``module`` and the config, and fold the scaling in. ``key`` names the
    adapter and module in errors."""
    a, b = raw.A, raw.B
    in_f, out_f = _features(key, module, raw)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
        names = ("lora_embedding_A", "lora_embedding_B") if raw.embedding else ("lora_A", "lora_B")
        raise AdapterError(
            f"{key}: {names[0]} {tuple(a.shape)} / {names[1]} {tuple(b.shape)} do not fit the base layer "
            f"({in_f} -> {out_f}); the adapter was trained for a different base model"
        )
    r = a.shape[0]
    if r != cfg.rank_for(name):
        raise AdapterError(f"{key}: weights have rank {r} but the config says r={cfg.rank_for(name)}")
    if max_rank is not None and r > max_rank:
        raise AdapterError(f"{key}: rank {r} is above the configured maximum {max_rank}")
    _check_extras(key, raw, cfg, out_f)
    _check_base_copy(key, module, raw)
    scale = cfg.scale_for(name)
    g = None
    if raw.magnitude is not None:
        norm = dora_norm(weight_rows(module).detach(), b, a, scale).to(device=raw.magnitude.device)
        g = raw.magnitude.float() / norm
    dtype, home = base_dtype_device(module)
    device = home if device is None else device

    def cast(t: torch.Tensor) -> torch.Tensor:
        """One copy into a fresh contiguous tensor of the model's dtype (transposes included)."""
        return torch.empty(t.shape, dtype=dtype, device=device).copy_(t)

    b_t = b.t() * scale if b.dtype == torch.float32 or dtype != torch.float32 else b.float().t() * scale
    bias = None if raw.bias is None else raw.bias.float() * scale
    if g is not None:
        b_t = b_t.float() * g
        bias = None if bias is None else bias * g
    if b_t.dtype not in (torch.float32, dtype):
        b_t = b_t.float()  # scale applied in float32, rounded once to the model's dtype
    # ``a`` is held [in, r] as the transposed view of a row-major [r, in] copy (PEFT's lora_A layout): the
    # CPU kernel streams its rows, matmuls take the view as it is.
    a_t = cast(a.t()) if raw.embedding else cast(a).t()
    return LoraWeights(
        a_t, cast(b_t), None if bias is None else cast(bias), None if g is None else cast(g), raw.embedding
    )


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_finite(
    where: str, named: list[tuple[str, str, torch.Tensor]], scaling: Callable[[str], str] | None = None
) -> None:
    """Every tensor is floating point and free of NaN/Inf, with a float32 norm that does not overflow.
    One fused ``_foreach_norm`` over all of them (a per-tensor ``isfinite`` costs more than reading the
    file); per tensor only to name the culprit. ``scaling``: the tensors are scaled ones; it describes
    a module's scaling for the message."""
    for module, label, t in named:
        if t.dtype not in _FLOATS:
            raise AdapterError(
                f"{where}, module {module!r}: {label} has dtype {t.dtype}; adapter weights must be float16, "
                "bfloat16, float32 or float64"
            )
    if not named:
        return
    norms = _float32_norms([t for _, _, t in named])
    if bool(torch.isfinite(norms).all()):
        return
    for (module, label, t), norm in zip(named, norms, strict=True):
        if bool(torch.isfinite(norm)):
            continue
        what = (
            "NaN or Inf values"
            if not bool(torch.isfinite(t).all())
            else "values whose norm overflows float32"
        )
        if scaling is None:
            raise AdapterError(f"{where}, module {module!r}: {label} holds {what}; the adapter is corrupt")
        raise AdapterError(
            f"{where}, module {module!r}: {label} holds {what} once scaled ({scaling(module)}) and cast to "
            f"{t.dtype}; the scaling is absurd for these weights: fix lora_alpha / alpha_pattern / r"
        )


def _float32_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's 2-norm, accumulated in float32 (float64 tensors: in float64), as float32."""
    wide = [i for i, t in enumerate(tensors) if t.dtype == torch.float64]
    narrow = [i for i, t in enumerate(tensors) if t.dtype != torch.float64]
    norms = torch.empty(len(tensors), dtype=torch.float32)
    for index, dtype in ((wide, None), (narrow, torch.float32)):
        if index:
            parts = torch._foreach_norm([tensors[i] for i in index], 2, dtype=dtype)
            norms[index] = torch.stack([p.float().cpu() for p in parts])
    return norms


def _features(key: str, module: nn.Module, raw: ModuleLora) -> tuple[int, int]:
    if raw.embedding:
        if not isinstance(module, nn.Embedding):
            raise AdapterError(
                f"{key}: embedding LoRA weights for a {type(module).__name__}, not an embedding"
            )
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Embedding):
        raise AdapterError(f"{key}: lora_A/lora_B on an embedding; PEFT saves lora_embedding_A/B there")
    return base_features(module)


def _check_extras(key: str, raw: ModuleLora, cfg: LoraConfig, out_f: int) -> None:
    if cfg.use_dora and raw.magnitude is None:
        raise AdapterError(f"{key}: use_dora=true but the file has no lora_magnitude_vector for this module")
    if raw.magnitude is not None:
        if not cfg.use_dora:
            raise AdapterError(
                f"{key}: DoRA magnitude in the file but use_dora is false; config and weights disagree"
            )
        if tuple(raw.magnitude.shape) != (out_f,):
            raise AdapterError(
                f"{key}: DoRA lora_magnitude_vector has shape {tuple(raw.magnitude.shape)}, expected ({out_f},)"
            )
    if raw.bias is not None and not cfg.lora_bias:
        raise AdapterError(f"{key}: lora_B has a bias but lora_bias is false; config and weights disagree")
    if cfg.lora_bias and raw.bias is None and not raw.embedding:
        raise AdapterError(f"{key}: lora_bias=true but the file has no lora_B bias for this module")
    if raw.bias is not None and tuple(raw.bias.shape) != (out_f,):
        raise AdapterError(f"{key}: lora_B bias has shape {tuple(raw.bias.shape)}, expected ({out_f},)")


def _check_base_copy(key: str, module: nn.Module, raw: ModuleLora) -> None:
    """PEFT saves the base weight with embedding / lm_head adapters; a different one (e.g. a resized or
    retrained vocabulary) would change every row's base model, which a shared base cannot do."""
    saved = raw.base_weight
    if saved is None:
        return
    weight = module.weight  # an embedding or output head
    assert isinstance(weight, torch.Tensor)
    weight = weight.detach()
    if saved.shape != weight.shape or not torch.allclose(
        saved.to(device=weight.device, dtype=torch.float32), weight.float(), rtol=1e-2, atol=1e-3
    ):
        raise AdapterError(
            f"{key}: the adapter saves a base layer weight ({tuple(saved.shape)}) that differs from the base "
            "model's; it was trained on a changed (e.g. resized) base layer, which a shared base cannot serve"
        )


def prepare_saved(
    key: str, module: nn.Module, params: dict[str, torch.Tensor], device: torch.device | str | None
) -> dict[str, torch.Tensor]:
    """Check a ``modules_to_save`` copy against the base module: token-wise module, same parameters."""
    if not is_token_wise(module):
        raise AdapterError(
            f"{key}: modules_to_save of a {type(module).__name__} is not supported in mixed batches (only "
            "linear, embedding and norm layers, whose copy can run for a subset of the tokens)"
        )
    expected = copy_parameters(module)
    if set(params) != set(expected):
        raise AdapterError(
            f"{key}: modules_to_save copy has parameters {sorted(params)}, the base module {sorted(expected)}"
        )
    out = {}
    for pname, tensor in params.items():
        shape, dtype, ref_device = expected[pname]
        if tensor.shape != shape:
            raise AdapterError(
                f"{key}: modules_to_save {pname} has shape {tuple(tensor.shape)}, the base module "
                f"{tuple(shape)}; the adapter was trained for a different base model"
            )
        out[pname] = tensor.to(device=ref_device if device is None else device, dtype=dtype, copy=True)
    return out
