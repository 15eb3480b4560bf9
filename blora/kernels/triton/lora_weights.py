"""One layer's adapter weights as the Triton LoRA kernels read them: offset tables into the weights in place.

A layer has ``L`` output slices (1 for a plain projection; 3 for fused q/k/v, 2 for gate/up) sharing one
input. For each (slice, slot) the tables give the element offset of the adapter's ``A`` and ``B`` from one
base tensor, and its rank (0: the slot has no LoRA on that slice, its tokens keep the base output there).
``A`` is read as [rank, in] rows (contiguous along the input, coalesced by the shrink) and ``B`` as
[rank, out_l] rows (contiguous along the output, coalesced by the expand): exactly blora's stored layout
(``A`` [in, r] as the transposed view of a row-major [r, in] tensor, ``B`` [r, out] row-major, scaling folded
into ``B``), so no weight is copied or padded: memory, work and bytes read follow each adapter's own rank.
The tables are indexed by slot id (``num_slots`` = largest slot + 1) and built once per set of weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Pair = tuple[torch.Tensor, torch.Tensor]


class LoraWeights:
    """Device tables ``a_off``/``b_off`` int64 [L, S], ``ranks`` int32 [L, S], ``slice_out``/``slice_col``
    int32 [L] over ``base`` (the pointer the kernels add offsets to), and ``host_ranks`` for launch sizes.

    Semantics: slot ``s`` on slice ``l`` is ``A = base.flatten()[a_off:a_off + r*in].view(r, in).T`` and
    ``B = base.flatten()[b_off:b_off + r*out_l].view(r, out_l)`` (offsets may point outside ``base``'s own
    storage, into the other weight tensors, which ``pairs`` holds alive).
    """

    def __init__(
        self,
        slices: Sequence[Mapping[int, Pair]],
        in_features: int,
        out_features: Sequence[int],
        device: torch.device | str,
        dtype: torch.dtype,
        cols: Sequence[int] | None = None,
    ) -> None:
        """``slices[l]``: slot -> (``A`` [in, r], ``B`` [r, out_l]) for output slice ``l``, whose columns in
        the layer's output start at ``cols[l]`` (default: the slices side by side from column 0)."""
        self.in_features = in_features
        self.out_features = tuple(int(o) for o in out_features)
        self.num_slices = len(self.out_features)
        self.max_out, self.total_out = max(self.out_features), sum(self.out_features)
        self.num_slots = max((s for sl in slices for s in sl), default=-1) + 1
        pairs = [
            {s: self._layout(s, i, a, b, dtype) for s, (a, b) in sl.items()} for i, sl in enumerate(slices)
        ]
        self.pairs = pairs
        first = next((a for sl in pairs for a, _ in sl.values()), None)
        self.base = torch.empty(1, dtype=dtype, device=device) if first is None else first
        if self.base.device != torch.device(device):
            raise ValueError(f"LoRA weights are on {self.base.device}, the kernels run on {device}")
        size = torch.tensor([], dtype=dtype).element_size()
        a_off = [[0] * self.num_slots for _ in pairs]
        b_off = [[0] * self.num_slots for _ in pairs]
        self.host_ranks = [[0] * self.num_slots for _ in pairs]
        for i, sl in enumerate(pairs):
            for s, (a, b) in sl.items():
                a_off[i][s] = (a.data_ptr() - self.base.data_ptr()) // size
                b_off[i][s] = (b.data_ptr() - self.base.data_ptr()) // size
                self.host_ranks[i][s] = int(a.shape[1])
        if cols is None:
            cols = [sum(self.out_features[:i]) for i in range(self.num_slices)]
        ints = [*(v for row in a_off for v in row), *(v for row in b_off for v in row)]
        small = [*(v for row in self.host_ranks for v in row), *self.out_features, *cols]
        shape = (self.num_slices, self.num_slots)
        off = _to_device(torch.tensor(ints, dtype=torch.int64), device)
        self.a_off, self.b_off = off[: len(ints) // 2].view(shape), off[len(ints) // 2 :].view(shape)
        meta = _to_device(torch.tensor(small, dtype=torch.int32), device)
        n = self.num_slices * self.num_slots
        self.ranks = meta[:n].view(shape)
        self.slice_out, self.slice_col = meta[n : n + self.num_slices], meta[n + self.num_slices :]
        self.dtype = dtype

    def _layout(
        self, slot: int, slice_idx: int, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
    ) -> Pair:
        """``a`` [in, r] and ``b`` [r, out_l] in the kernels' layout (copied only when they are not)."""
        out = self.out_features[slice_idx]
        if a.shape[0] != self.in_features or b.shape != (a.shape[1], out):
            raise ValueError(
                f"slot {slot} slice {slice_idx}: expected A [{self.in_features}, r] and B [r, {out}], "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.dtype != dtype or not a.t().is_contiguous():
            a = a.t().to(dtype).contiguous().t()
        if b.dtype != dtype or not b.is_contiguous():
            b = b.to(dtype).contiguous()
        return a, b

    def step_rank(self, active: Sequence[int]) -> int:
        """Largest rank among ``active`` slots over all slices (host only): the width of the launch grid."""
        return max((r[s] for r in self.host_ranks for s in active if s < self.num_slots), default=0)


def _to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host -> device without a stream sync: a copy from pageable memory waits for the stream, one from
    pinned memory is queued (non-blocking)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
