"""The per-step LoRA plan: which tokens use which adapter slot, built once on the host per forward.

The model runner builds a ``LoraPlan`` from the scheduler's Python lists before any tensor exists (library
mode builds one from the ``adapter_ids`` of a ``generate`` call) and moves its index tensors to the device in
ONE transfer. Every LoRA layer of the forward reads the same plan; nothing in a layer regroups tokens or
reads a device tensor back to the host. Counts and the distinct slots are Python values on the plan, so a
backend decides shapes and paths without a host sync.

Mixtures of adapters need nothing here: a mixture is served as one more slot whose weights concatenate
its components' ranks (the weights folded into ``B``, see ``blora.lora.mixtures``), so every token still
has exactly one slot and the plan carries no per-row mixture weights.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

_KEYS = itertools.count()


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor just built from Python lists) on ``device``. On CUDA it is staged in pinned
    memory and copied with ``non_blocking=True``: a copy from pageable memory would make the host wait for
    all queued GPU work first. (PyTorch's pinned-memory cache keeps the staging block until the copy is
    done, so it is never overwritten in flight.) Elsewhere a plain ``.to`` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def lists_to_device(parts: Sequence[Sequence[int]], device: torch.device | str) -> list[torch.Tensor]:
    """Python int lists -> int64 tensors on ``device``. On CUDA: one pinned buffer, ONE non-blocking copy,
    one view per list. On CPU: one plain tensor per list (no packing, nothing to copy)."""
    device = torch.device(device)
    if device.type != "cuda":
        return [torch.tensor(p, dtype=torch.long, device=device) for p in parts]
    buf = to_device(torch.tensor(list(itertools.chain.from_iterable(parts)), dtype=torch.long), device)
    return list(torch.split(buf, [len(p) for p in parts]))


@dataclass(eq=False)
class LoraPlan:
    """Tokens of one forward grouped by adapter slot.

    Host values: ``num_tokens`` N, ``active`` the sorted distinct slots >= 0 (U of them), ``counts`` [U]
    tokens per active slot, ``full`` (every token uses ``active[0]``), ``key`` (unique per plan, for
    caches keyed by plan: never reused, unlike ``id()``).

    Device tensors (one transfer, views of one buffer): ``slots`` [N] slot per token (-1 = base);
    ``rows`` [sum(counts)] token positions grouped by adapter (ascending within a group); ``offsets``
    [U + 1] with the tokens of ``active[i]`` at ``rows[offsets[i]:offsets[i + 1]]``; ``starts`` /
    ``lengths`` [U] the same as start and length per group; ``slot_ids`` [U] ``active`` as a tensor;
    ``index[i]`` the view ``rows[offsets[i]:offsets[i + 1]]``.
    """

    num_tokens: int
    active: tuple[int, ...]
    counts: tuple[int, ...]
    full: bool
    slots: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor
    slot_ids: torch.Tensor
    index: list[torch.Tensor]
    key: int = field(default_factory=lambda: next(_KEYS))
    _padded: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, slots: Sequence[int], device: torch.device | str = "cpu") -> LoraPlan:
        """The plan for per-token ``slots`` (a host list, -1 = base), its tensors on ``device``."""
        n = len(slots)
        active = tuple(sorted({s for s in slots if s >= 0}))
        positions: dict[int, list[int]] = {s: [] for s in active}
        for pos, s in enumerate(slots):
            if s >= 0:
                positions[s].append(pos)
        counts = tuple(len(positions[s]) for s in active)
        offsets = [0, *itertools.accumulate(counts)]
        flat = [*slots, *itertools.chain.from_iterable(positions[s] for s in active), *offsets, *active]
        buf = to_device(torch.tensor(flat, dtype=torch.long), device)  # the plan's one host -> device copy
        rows_end = n + offsets[-1]
        off_end = rows_end + len(offsets)
        rows, offsets_t = buf[n:rows_end], buf[rows_end:off_end]
        index = [rows[offsets[i] : offsets[i + 1]] for i in range(len(active))]
        return cls(
            num_tokens=n,
            active=active,
            counts=counts,
            full=len(active) == 1 and counts[0] == n,
            slots=buf[:n],
            rows=rows,
            offsets=offsets_t,
            slot_ids=buf[off_end:],
            index=index,
        )

    @classmethod
    def from_tensor(cls, slots: torch.Tensor) -> LoraPlan:
        """The plan for a slot tensor (library mode, tests): one read to the host, tensors on its device."""
        return cls.build(slots.reshape(-1).tolist(), slots.device)

    @property
    def any_adapter(self) -> bool:
        return bool(self.active)

    @functools.cached_property
    def max_count(self) -> int:
        """Tokens of the busiest adapter (0 when none)."""
        return max(self.counts, default=0)

    @property
    def starts(self) -> torch.Tensor:
        """[U] first entry of each group in ``rows``."""
        return self.offsets[:-1]

    @property
    def lengths(self) -> torch.Tensor:
        """[U] tokens of each group (``counts`` on the device)."""
        return self.offsets[1:] - self.offsets[:-1]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``offsets``, ``rows``): the CPU kernel's view of the groups."""
        return self.offsets, self.rows

    def subset(self, positions: Sequence[int]) -> LoraPlan:
        """The groups at ``positions`` (into ``active``) only, sharing this plan's tensors; for ops that
        loop over ``index``/``counts`` (segments). Its ``rows``/``offsets`` stay the full plan's."""
        return LoraPlan(
            num_tokens=self.num_tokens,
            active=tuple(self.active[i] for i in positions),
            counts=tuple(self.counts[i] for i in positions),
            full=False,
            slots=self.slots,
            rows=self.rows,
            offsets=self.offsets,
            slot_ids=self.slot_ids,
            index=[self.index[i] for i in positions],
        )

    def padded(
        self, members: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For adapters ``members`` (positions into ``active``): [n, M] token positions padded with the
        adapter's first token, and a [n, M, 1] mask of real entries (None when no padding was needed).
        Cached on the plan, so every layer of the forward reuses it."""
        key = (members, dtype)
        hit = self._padded.get(key)
        if hit is None:
            m = max(self.counts[i] for i in members)
            device = self.slots.device
            pos = torch.empty(len(members), m, dtype=torch.long, device=device)
            valid = torch.zeros(len(members), m, 1, dtype=dtype, device=device)
            for k, i in enumerate(members):
                idx, c = self.index[i], self.counts[i]
                pos[k, :c] = idx
                pos[k, c:] = idx[:1]
                valid[k, :c] = 1
            ragged = any(self.counts[i] != m for i in members)
            hit = (pos, valid if ragged else None)
            self._padded[key] = hit
        return hit


@dataclass(eq=False)
class LayerLoras:
    """One layer's adapters among a plan's active slots, for one version of the layer's weights.

    ``slots`` the layer's slots among ``plan.active`` (ascending), ``positions`` their indices into
    ``plan.active``, ``pairs`` their (``A`` [in, r], ``B`` [r, out]) with the scaling folded into ``B``,
    ``ranks`` host ints. ``cache``: whatever a backend derives from these weights (stacked copies, kernel
    tables), dropped with this object when the layer's weights or the set of active slots change.
    """

    slots: tuple[int, ...]
    positions: tuple[int, ...]
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    in_features: int
    out_features: int
    cache: dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def ranks(self) -> list[int]:
        return [int(a.shape[1]) for a, _ in self.pairs]

    @functools.cached_property
    def max_rank(self) -> int:
        return max(self.ranks)

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        return self.pairs[0][0].dtype

    def covers_plan(self, plan: LoraPlan) -> bool:
        """Every active slot of ``plan`` has weights here."""
        return len(self.positions) == len(plan.active)


class OutputSlice(NamedTuple):
    """One projection of a fused output: its LoRA ``loras`` writes output columns ``[start, stop)``.
    (A tuple: made per projection per step on the hot path.)"""

    loras: LayerLoras
    start: int
    stop: int
