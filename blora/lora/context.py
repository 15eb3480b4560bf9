"""Scoped per-forward LoRA state: which adapter slot each token uses.

The state lives in a ``contextvars.ContextVar``: it is visible to every LoRA layer inside the ``with``
block of the current thread/task and to nothing else, so it never leaks into the next call or another
thread. Token metadata (who uses which slot, grouped index tensors) is computed once per forward and
shared by all layers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

_CURRENT: contextvars.ContextVar[LoraBatch | None] = contextvars.ContextVar("blora_lora_batch", default=None)


@dataclass
class TokenGroups:
    """Tokens of one forward grouped by adapter slot (built once per forward and token count).

    ``slots``: [N] slot per token (-1 = base). ``active``: sorted distinct slots >= 0. ``index[i]``: the
    token positions of ``active[i]``. ``padded``: [U, M] positions padded with 0 and ``valid``: [U, M, 1]
    mask (for rank-grouped bmm). ``full``: every token uses ``active[0]``.
    """

    slots: torch.Tensor
    active: tuple[int, ...]
    index: list[torch.Tensor]
    counts: list[int]
    full: bool
    _padded: dict = field(default_factory=dict, repr=False)
    _flat: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, slots: torch.Tensor) -> TokenGroups:
        flat = slots.reshape(-1)
        cpu = flat.tolist()
        active = tuple(sorted({s for s in cpu if s >= 0}))
        positions: dict[int, list[int]] = {s: [] for s in active}
        for pos, s in enumerate(cpu):
            if s >= 0:
                positions[s].append(pos)
        index = [torch.tensor(positions[s], dtype=torch.long, device=flat.device) for s in active]
        counts = [len(positions[s]) for s in active]
        full = len(active) == 1 and counts[0] == len(cpu)
        return cls(slots=flat, active=active, index=index, counts=counts, full=full)

    @functools.cached_property
    def max_count(self) -> int:
        """Tokens of the busiest adapter (0 when none)."""
        return max(self.counts, default=0)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``offsets`` [U + 1] and ``rows`` [sum of counts]: the tokens of ``active[i]`` are
        ``rows[offsets[i]:offsets[i + 1]]`` (the CPU kernel's view of ``index``). Cached for the forward."""
        if self._flat is None:
            offsets = [0]
            for c in self.counts:
                offsets.append(offsets[-1] + c)
            device = self.slots.device
            self._flat = (torch.tensor(offsets, dtype=torch.long, device=device), torch.cat(self.index))
        return self._flat

    def padded(
        self, members: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For adapters ``members`` (positions into ``active``): [n, M] token positions padded with the
        adapter's first token, and a [n, M, 1] mask of real entries (None when no padding was needed).
        Cached for the forward, so every layer reuses it."""
        key = (members, dtype)
        hit = self._padded.get(key)
        if hit is None:
            m = max(self.counts[i] for i in members)
            device = self.slots.device
            pos = torch.empty(len(members), m, dtype=torch.long, device=device)
            valid = torch.zeros(len(members), m, 1, dtype=dtype, device=device)
            for k, i in enumerate(members):
                idx = self.index[i]
                pos[k, : idx.numel()] = idx
                pos[k, idx.numel() :] = idx[0]
                valid[k, : idx.numel()] = 1
            ragged = any(self.counts[i] != m for i in members)
            hit = (pos, valid if ragged else None)
            self._padded[key] = hit
        return hit


class LoraBatch:
    """Per-forward LoRA routing: slot ids per token or per row, expanded lazily to token groups."""

    def __init__(self, slots: torch.Tensor, per_row: bool) -> None:
        self.slots = slots.reshape(-1).to(torch.long)
        self.per_row = per_row
        self.any_adapter = bool((self.slots >= 0).any())
        self._groups: dict[int, TokenGroups] = {}

    def groups(self, num_tokens: int) -> TokenGroups:
        """Token groups for a layer input flattened to ``num_tokens`` rows (cached per token count)."""
        groups = self._groups.get(num_tokens)
        if groups is None:
            groups = TokenGroups.build(self._token_slots(num_tokens))
            self._groups[num_tokens] = groups
        return groups

    def _token_slots(self, num_tokens: int) -> torch.Tensor:
        n = self.slots.numel()
        if not self.per_row:
            if n != num_tokens:
                raise ValueError(f"lora_batch got {n} per-token slots but the layer sees {num_tokens} tokens")
            return self.slots
        if num_tokens % n == 0:
            return self.slots.repeat_interleave(num_tokens // n)
        raise ValueError(f"lora_batch got {n} per-row slots but the layer sees {num_tokens} tokens")


def current_batch() -> LoraBatch | None:
    return _CURRENT.get()


@contextlib.contextmanager
def lora_batch(slots: torch.Tensor | None, *, per_row: bool = False) -> Iterator[LoraBatch | None]:
    """Route the forwards inside the block through per-token (or per-row) adapter slots.

    ``slots``: LongTensor, -1 for the base model. With ``per_row=False`` one entry per token in the order of
    ``hidden.reshape(-1, hidden_size)``; with ``per_row=True`` one entry per batch row ([B]), each row's
    tokens (and rows repeated by ``generate`` for beams / num_return_sequences) using the row's slot.
    ``None`` means base model for every token.
    """
    batch = None if slots is None else LoraBatch(slots, per_row)
    token = _CURRENT.set(batch)
    try:
        yield batch
    finally:
        _CURRENT.reset(token)
