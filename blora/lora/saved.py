"""PEFT ``modules_to_save``: per-adapter full copies of a module, selected per token.

Only token-wise modules qualify (the output of token ``t`` depends on input ``t`` alone): linear layers,
embeddings and normalization layers. That covers what causal-LM adapters save (``lm_head``,
``embed_tokens``, norms); a copy of a whole block could not be run for a subset of the tokens.

On a quantized base model (``blora.models.quant``) the LM head and tied input embeddings are int8 layers;
an adapter's copy of them is the float layer the adapter trained (``weight``, and ``bias``), so it runs as
that float layer (``F.linear`` / ``F.embedding``) for its tokens, as PEFT runs it on the dequantized model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.stateless import functional_call

from blora.lora.context import current_batch

# Quantized layers (``blora.models.quant``, matched by class name as ``blora.lora.layers`` does): their
# copies are float layers of these shapes.
QUANTIZED = ("QuantizedLinear", "QuantizedEmbedding")


def is_token_wise(module: nn.Module) -> bool:
    """Linear / Conv1D / Embedding / *Norm / quantized linear modules without submodules."""
    if list(module.children()):
        return False
    name = type(module).__name__
    return (
        isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm))
        or name in ("Conv1D", *QUANTIZED)
        or "Norm" in name
    )


def copy_parameters(module: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype, torch.device]]:
    """(shape, dtype, device) of each parameter a ``modules_to_save`` copy of ``module`` holds: the
    module's own parameters, or for a quantized layer those of the float layer it stands for."""
    name = type(module).__name__
    if name not in QUANTIZED:
        return {k: (p.shape, p.dtype, p.device) for k, p in module.named_parameters(recurse=False)}
    q: torch.Tensor = module.qweight  # type: ignore[assignment]  # buffers of blora.models.quant's layers
    dtype: torch.dtype = module.dtype  # type: ignore[assignment]
    if name == "QuantizedEmbedding":
        shape = torch.Size((module.num_embeddings, module.embedding_dim))  # type: ignore[arg-type]
    else:
        shape = torch.Size((module.out_features, module.in_features))  # type: ignore[arg-type]
    params = {"weight": (shape, dtype, q.device)}
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        params["bias"] = (bias.shape, bias.dtype, bias.device)
    return params


def run_copy(original: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``original``'s forward with ``params`` as its parameters; a quantized layer's copy runs as the float
    linear / embedding it stands for."""
    name = type(original).__name__
    if name == "QuantizedLinear":
        return F.linear(x, params["weight"], params.get("bias"))
    if name == "QuantizedEmbedding":
        return F.embedding(x, params["weight"], original.padding_idx)  # type: ignore[arg-type]
    return functional_call(original, params, (x,))


class SavedModules(nn.Module):
    """``y[t] = copy_a(x[t])`` for tokens of slots ``a`` that saved this module, else ``inner(x)[t]``.

    ``inner`` is the module in the model (possibly wrapped for other adapters' LoRA); ``original`` the
    module the copies were made of: a copy runs ``original``'s forward with the slot's parameters
    (``functional_call``), so no module is duplicated.
    Semantics: ``y = inner(x); y[idx_a] = functional_call(original, params_a, x[idx_a])`` for each slot ``a``
    (``run_copy``: a quantized ``original`` runs as its float layer).
    """

    def __init__(self, inner: nn.Module, original: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.copies: dict[int, dict[str, torch.Tensor]] = {}
        self._original = [original]  # a list: not registered as a submodule a second time

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("inner", "_original"):
                raise
            return getattr(self.inner, name)  # weight, num_embeddings, ... of the module it stands for

    def set_saved(self, slot: int, params: dict[str, torch.Tensor]) -> None:
        self.copies[slot] = params

    def reset_saved(self, slot: int) -> None:
        self.copies.pop(slot, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.inner(x, *args, **kwargs)
        batch = current_batch()
        if batch is None or not self.copies or not batch.any_adapter:
            return y
        ids = x.dtype in (torch.long, torch.int32)
        flat = x.reshape(-1) if ids else x.reshape(-1, x.shape[-1])
        groups = batch.plan(flat.shape[0])
        y2 = y.view(-1, y.shape[-1])
        for slot, idx in zip(groups.active, groups.index, strict=True):
            params = self.copies.get(slot)
            if params is not None:
                rows = run_copy(self.original, params, flat.index_select(0, idx))
                y2.index_copy_(0, idx, rows.to(y2.dtype))
        return y
