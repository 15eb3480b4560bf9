"""Scoped per-forward LoRA state: the step's ``LoraPlan`` (which adapter slot each token uses) and the
``LoraBackend`` that does the math.

The state lives in a ``contextvars.ContextVar``: it is visible to every LoRA layer inside the ``with``
block of the current thread/task and to nothing else, so it never leaks into the next call or another
thread. The plan is built on the host from the slot list, once per forward and token count, and shared by
all layers; layers only read it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch

from blora.lora import backends
from blora.lora.backends import LoraBackend
from blora.lora.plan import LoraPlan

_CURRENT: contextvars.ContextVar[LoraBatch | None] = contextvars.ContextVar("blora_lora_batch", default=None)


class LoraBatch:
    """Per-forward LoRA routing: host slot ids per token (or per row), their plan(s) and the backend.

    ``slots``: a host list, -1 for the base model. ``per_row``: one entry per batch row, each row's tokens
    using the row's slot (a layer seeing ``k`` tokens per row gets each slot repeated ``k`` times).
    """

    def __init__(
        self, slots: Sequence[int], device: torch.device, backend: LoraBackend, per_row: bool = False
    ) -> None:
        self.slots = list(slots)
        self.device = device
        self.backend = backend
        self.per_row = per_row
        self.any_adapter = any(s >= 0 for s in self.slots)
        self._plans: dict[int, LoraPlan] = {}

    def plan(self, num_tokens: int) -> LoraPlan:
        """The plan for a layer input flattened to ``num_tokens`` rows (built on first use, then shared)."""
        plan = self._plans.get(num_tokens)
        if plan is None:
            plan = self._plans[num_tokens] = LoraPlan.build(self._token_slots(num_tokens), self.device)
        return plan

    def _token_slots(self, num_tokens: int) -> list[int]:
        n = len(self.slots)
        if not self.per_row:
            if n != num_tokens:
                raise ValueError(f"lora_batch got {n} per-token slots but the layer sees {num_tokens} tokens")
            return self.slots
        if n and num_tokens % n == 0:
            k = num_tokens // n
            return [s for s in self.slots for _ in range(k)]
        raise ValueError(f"lora_batch got {n} per-row slots but the layer sees {num_tokens} tokens")


def current_batch() -> LoraBatch | None:
    return _CURRENT.get()


@contextlib.contextmanager
def lora_context(batch: LoraBatch | None) -> Iterator[LoraBatch | None]:
    """Make ``batch`` the LoRA routing of the forwards inside the block (None: base model only)."""
    token = _CURRENT.set(batch)
    try:
        yield batch
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def lora_batch(
    slots: torch.Tensor | None, *, per_row: bool = False, backend: LoraBackend | str | None = None
) -> Iterator[LoraBatch | None]:
    """Route the forwards inside the block through per-token (or per-row) adapter slots.

    ``slots``: LongTensor, -1 for the base model. With ``per_row=False`` one entry per token in the order of
    ``hidden.reshape(-1, hidden_size)``; with ``per_row=True`` one entry per batch row ([B]), each row's
    tokens (and rows repeated by ``generate`` for beams / num_return_sequences) using the row's slot.
    ``None`` means base model for every token. ``backend``: a ``LoraBackend`` or a registered name
    (``blora.lora.backends``); default the best one for the slots' device. The slots are read to the host
    once, here.
    """
    batch = None
    if slots is not None:
        device = slots.device
        if backend is None:
            backend = backends.default(device)
        elif isinstance(backend, str):
            backend = backends.select(backend, backends.BackendOptions(device))
        batch = LoraBatch(slots.reshape(-1).tolist(), device, backend, per_row)
    with lora_context(batch):
        yield batch
