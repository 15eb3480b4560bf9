"""LoRA on an ``nn.Embedding`` (PEFT's ``lora_embedding_A/B``), every token with its own adapter slot."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blora.lora.context import current_batch


class LoraEmbedding(nn.Module):
    """``y = base(ids) + E_a[ids] @ B_a`` for the tokens of slot ``a`` in the current ``lora_batch``.

    Per slot: ``a_t`` [num_embeddings, r] (PEFT's ``lora_embedding_A`` transposed), ``b_t`` [r, dim]
    (``lora_embedding_B`` transposed, scaling folded in). DoRA's per-dimension scale ``g`` multiplies the
    slot's base embedding (``g`` is also folded into ``b_t``). Like PEFT, the LoRA term is multiplied by the
    base layer's ``embed_scale`` when it has one (Gemma-style scaled embeddings).
    Semantics: ``y[t] = g * base(ids)[t] + F.embedding(ids[t], a_t) @ b_t * embed_scale``.
    """

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scales: dict[int, torch.Tensor] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def set_lora(
        self, slot: int, a_t: torch.Tensor, b_t: torch.Tensor, dora_scale: torch.Tensor | None = None
    ) -> None:
        self.pairs[slot] = (a_t, b_t)
        self.scales.pop(slot, None)
        if dora_scale is not None:
            self.scales[slot] = dora_scale

    def reset_lora(self, slot: int) -> None:
        self.pairs.pop(slot, None)
        self.scales.pop(slot, None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        batch = current_batch()
        if batch is None or not self.pairs or not batch.any_adapter:
            return y
        flat = ids.reshape(-1)
        groups = batch.plan(flat.numel())
        y2 = y.view(-1, y.shape[-1])
        embed_scale = getattr(self.base, "embed_scale", None)
        for slot, idx in zip(groups.active, groups.index, strict=True):
            pair = self.pairs.get(slot)
            if pair is None:
                continue
            a_t, b_t = pair
            delta = F.embedding(flat.index_select(0, idx), a_t) @ b_t
            if embed_scale is not None:
                delta = delta * torch.as_tensor(embed_scale, dtype=delta.dtype, device=delta.device)
            rows = y2.index_select(0, idx)
            scale = self.scales.get(slot)
            if scale is not None:
                rows.mul_(scale)
            y2.index_copy_(0, idx, rows.add_(delta.to(rows.dtype)))
        return y
