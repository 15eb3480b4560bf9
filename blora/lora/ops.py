"""Batched multi-LoRA ops: a plain reference and three fast paths, picked per shape.

Every op adds, in place, ``delta[t] = x[t] @ A[s_t] @ B[s_t]`` to ``y[t]`` for each token ``t`` whose slot
``s_t`` is >= 0 (scaling is folded into ``B``). Weights are stored transposed for right-multiplication:
``A``: [in, r], ``B``: [r, out]; ranks may differ between adapters (no padding to a common rank).

- ``segments`` (SGMV-like): one GEMM pair per adapter over that adapter's tokens. Best for prefill.
- ``grouped`` (BGMV-like): adapters of equal rank in one ``bmm`` pair over tokens padded per adapter.
  No loop over adapters, only over distinct ranks. Best for decode with many adapters.
- ``stacked``: all active adapters' A's concatenated to [in, sum(r)], one GEMM, a mask keeps each token's
  own block, one GEMM with the stacked B's. Two GEMMs in total; wastes U-times work. Best for few adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blora.lora.plan import LoraPlan

Pair = tuple[torch.Tensor, torch.Tensor]


def lora_reference(x: torch.Tensor, slots: torch.Tensor, weights: dict[int, Pair]) -> torch.Tensor:
    """Reference: [N, in] tokens, [N] slots -> [N, out] LoRA deltas.

    Semantics: ``delta[t] = x[t] @ weights[slots[t]][0] @ weights[slots[t]][1]`` if ``slots[t] >= 0`` else 0.
    """
    out_features = next(iter(weights.values()))[1].shape[1]
    delta = x.new_zeros(x.shape[0], out_features)
    for t in range(x.shape[0]):
        s = int(slots[t])
        if s >= 0:
            a, b = weights[s]
            delta[t] = x[t] @ a @ b
    return delta


def add_single(y: torch.Tensor, x: torch.Tensor, pair: Pair) -> None:
    """All tokens use one adapter. Semantics: ``y += x @ A @ B``."""
    a, b = pair
    y.addmm_(x @ a, b)


def add_segments(y: torch.Tensor, x: torch.Tensor, groups: LoraPlan, pairs: list[Pair]) -> None:
    """One GEMM pair per adapter segment. Semantics: ``y[idx_i] += x[idx_i] @ A_i @ B_i`` for each i."""
    for idx, (a, b) in zip(groups.index, pairs, strict=True):
        y.index_add_(0, idx, (x.index_select(0, idx) @ a) @ b)


@dataclass
class RankGroup:
    """Adapters sharing one (possibly padded) rank, weights stacked for ``bmm``.

    ``members``: positions into ``LoraPlan.active``. Adapters of smaller rank may be zero-padded up to
    the group's rank when that is cheaper than another pair of launches (decided per batch, per layer).
    """

    members: tuple[int, ...]
    A: torch.Tensor  # [n, in, r]
    B: torch.Tensor  # [n, r, out]


def rank_buckets(ranks: list[int], width: int, merge_below: int) -> list[list[int]]:
    """Indices of adapters grouped by rank; neighbouring ranks merge (zero-padding) while the padded
    multiply-adds per token (``width`` = in + out) stay under ``merge_below``. No tensors are touched."""
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    buckets: list[list[int]] = []
    waste = 0
    for i in order:
        if buckets:
            cur = buckets[-1]
            extra = waste + len(cur) * (ranks[i] - ranks[cur[-1]])  # padding of cur up to ranks[i]
            if extra * width <= merge_below:
                cur.append(i)
                waste = extra
                continue
        buckets.append([i])
        waste = 0
    return buckets


def build_rank_groups(members: list[int], pairs: list[Pair], merge_below: int) -> list[RankGroup]:
    """Group adapters by rank (see ``rank_buckets``) and stack each group's weights for ``bmm``."""
    width = pairs[0][0].shape[0] + pairs[0][1].shape[1]
    buckets = rank_buckets([int(a.shape[1]) for a, _ in pairs], width, merge_below)
    return [_stack(tuple(members[i] for i in b), [pairs[i] for i in b]) for b in buckets]


def _stack(members: tuple[int, ...], pairs: list[Pair]) -> RankGroup:
    """One C++ call per side: ``pad_sequence`` zero-pads the ranks and stacks. ``A`` is a transposed view."""
    from torch.nn.utils.rnn import pad_sequence

    A = pad_sequence([a.t() for a, _ in pairs], batch_first=True).transpose(1, 2)  # [n, in, r]
    B = pad_sequence([b for _, b in pairs], batch_first=True)  # [n, r, out]
    return RankGroup(members=members, A=A, B=B)


def add_grouped(y: torch.Tensor, x: torch.Tensor, groups: LoraPlan, rank_groups: list[RankGroup]) -> None:
    """Rank-grouped bmm. Semantics: as ``add_segments``; tokens padded per adapter, pads masked to zero."""
    for g in rank_groups:
        pos, valid = groups.padded(g.members, x.dtype)
        h = torch.bmm(x.index_select(0, pos.reshape(-1)).view(*pos.shape, x.shape[1]), g.A)  # [n, M, r]
        if valid is not None:
            h.mul_(valid)
        out = torch.bmm(h, g.B)  # [n, M, out]
        y.index_add_(0, pos.reshape(-1), out.reshape(-1, out.shape[-1]))


@dataclass
class Stacked:
    """Active adapters' weights concatenated along the rank: ``A`` [in, R], ``B`` [R, out], ``col_slot`` [R]."""

    A: torch.Tensor
    B: torch.Tensor
    col_slot: torch.Tensor


def build_stacked(slots: tuple[int, ...], pairs: list[Pair]) -> Stacked:
    a = torch.cat([p[0] for p in pairs], dim=1)
    b = torch.cat([p[1] for p in pairs], dim=0)
    cols = [torch.full((p[0].shape[1],), s, dtype=torch.long) for s, p in zip(slots, pairs, strict=True)]
    return Stacked(A=a, B=b, col_slot=torch.cat(cols).to(a.device))


def add_stacked(y: torch.Tensor, x: torch.Tensor, groups: LoraPlan, st: Stacked) -> None:
    """Two GEMMs over all active adapters. Semantics: ``y += ((x @ A_cat) * [slot_t == col_slot]) @ B_cat``."""
    h = x @ st.A
    h.mul_(groups.slots.unsqueeze(1) == st.col_slot.unsqueeze(0))
    y.addmm_(h, st.B)
