"""Per-step token -> adapter metadata for the Triton LoRA kernels, built on the host once per step.

Everything the kernels read about a step (which slot each token uses, the tokens grouped into one segment
per adapter) goes to the device in ONE non-blocking copy from pinned memory; the sizes the launches need
(segment count, longest segment, the step's largest rank) stay on the host as Python ints, so no layer
ever reads a device value back (no host sync per layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# SGMV (segments) reads an adapter's weights once per block of its tokens; BGMV (per token) once per token
# but needs no sorted copy of the tokens and keeps every token's work in its own program. With this many
# tokens per adapter or more on average, the segment kernels are used (decode of mixed batches with few
# tokens per adapter goes to BGMV).
SGMV_MIN_TOKENS = 4


@dataclass
class LoraKernelMeta:
    """One step's routing, on the kernels' device.

    ``token_slot`` [N] int32: slot of each token (-1 = base model, no LoRA work at all).
    ``token_idx`` [Na] int32: the Na tokens that use an adapter, sorted by slot (stable).
    ``seg_start`` / ``seg_len`` / ``seg_slot`` [G] int32: segment g is ``token_idx[seg_start[g] :
    seg_start[g] + seg_len[g]]``, all of slot ``seg_slot[g]``. Host ints: ``num_tokens`` N,
    ``num_segments`` G, ``max_seg_len``, ``active`` (distinct slots, sorted).
    """

    token_slot: torch.Tensor
    token_idx: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    seg_slot: torch.Tensor
    num_tokens: int
    num_segments: int
    max_seg_len: int
    active: tuple[int, ...]

    @classmethod
    def build(cls, slots: Sequence[int] | torch.Tensor, device: torch.device | str) -> LoraKernelMeta:
        """From per-token slots (a host list or CPU tensor; -1 = base) to device metadata, one copy."""
        cpu = slots.tolist() if isinstance(slots, torch.Tensor) else list(slots)
        by_slot: dict[int, list[int]] = {}
        for t, s in enumerate(cpu):
            if s >= 0:
                by_slot.setdefault(int(s), []).append(t)
        active = tuple(sorted(by_slot))
        token_idx = [t for s in active for t in by_slot[s]]
        lens = [len(by_slot[s]) for s in active]
        starts = [sum(lens[:i]) for i in range(len(lens))]
        packed = torch.tensor(cpu + token_idx + starts + lens + list(active), dtype=torch.int32)
        device = torch.device(device)
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        else:
            packed = packed.to(device)
        n, na, g = len(cpu), len(token_idx), len(active)
        token_slot, token_idx_t, seg_start, seg_len, seg_slot = torch.split(packed, [n, na, g, g, g])
        return cls(
            token_slot, token_idx_t, seg_start, seg_len, seg_slot,
            num_tokens=n, num_segments=g, max_seg_len=max(lens, default=0), active=active,
        )  # fmt: skip

    @property
    def num_adapter_tokens(self) -> int:
        return int(self.token_idx.numel())

    def prefer_sgmv(self) -> bool:
        """Segments when adapters have several tokens each on average (prefill, shared adapters)."""
        return self.num_segments > 0 and self.num_adapter_tokens >= SGMV_MIN_TOKENS * self.num_segments
