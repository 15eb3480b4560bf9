"""The PyTorch-ops backend: segments / rank-grouped bmm / stacked GEMMs (``blora.lora.ops``), picked per
layer and plan by a launch + multiply-add cost model. Runs on any device."""

from __future__ import annotations

import torch

from blora.lora import ops
from blora.lora.backends.base import ReferenceBackend
from blora.lora.plan import LayerLoras, LoraPlan

# Cost model for picking an op (in multiply-adds): one extra kernel launch is worth about OP_COST MACs.
# Measured with benchmarks/ops_bench.py: small bf16 matmuls on CPU cost ~25 us each (oneDNN), fp32 ~5 us.
OP_COST = {
    ("cpu", torch.bfloat16): 2_000_000,
    ("cpu", torch.float16): 2_000_000,
    "cpu": 200_000,
    "cuda": 400_000,
}


def op_cost(device_type: str, dtype: torch.dtype) -> int:
    return OP_COST.get((device_type, dtype), OP_COST.get(device_type, OP_COST["cuda"]))


class TorchBackend(ReferenceBackend):
    """``add`` picks one of ``ops``' paths per (plan, layer); ``shrink``/``expand`` are the reference's."""

    name = "torch"

    @classmethod
    def create(cls, options: object = None) -> TorchBackend:
        return cls()

    def add(
        self, y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras, max_work: int | None = None
    ) -> None:
        if x.dtype != loras.dtype:
            x = x.to(loras.dtype)
        self.add_ops(y, x, plan, loras)

    def add_ops(self, y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras) -> None:
        """``add`` for ``x`` already in the weights' dtype."""
        if plan.full:
            ops.add_single(y, x, loras.pairs[0])
            return
        method = self.method(plan, loras)
        if method == "stacked":
            ops.add_stacked(y, x, plan, stacked(loras))
        elif method == "grouped":
            ops.add_grouped(y, x, plan, grouped(loras))
        else:
            sub = plan if loras.covers_plan(plan) else plan.subset(loras.positions)
            ops.add_segments(y, x, sub, loras.pairs)

    def method(self, plan: LoraPlan, loras: LayerLoras) -> str:
        """The op for this plan and layer, chosen once per plan (cached on ``loras`` under ``plan.key``)."""
        hit = loras.cache.get("method")
        if hit is None or hit[0] != plan.key:
            hit = loras.cache["method"] = (plan.key, choose_method(plan, loras))
        return hit[1]


def cost(loras: LayerLoras) -> int:
    return op_cost(loras.pairs[0][0].device.type, loras.dtype)


def grouped(loras: LayerLoras) -> list[ops.RankGroup]:
    hit = loras.cache.get("grouped")
    if hit is None:
        hit = loras.cache["grouped"] = ops.build_rank_groups(
            list(loras.positions), loras.pairs, merge_below=4 * cost(loras)
        )
    return hit


def buckets(loras: LayerLoras) -> list[tuple[tuple[int, ...], int]]:
    """(members, padded rank) of the rank groups ``grouped`` would stack, without stacking."""
    hit = loras.cache.get("buckets")
    if hit is None:
        ranks = loras.ranks
        width = loras.in_features + loras.out_features
        hit = loras.cache["buckets"] = [
            (tuple(loras.positions[i] for i in b), max(ranks[i] for i in b))
            for b in ops.rank_buckets(ranks, width, merge_below=4 * cost(loras))
        ]
    return hit


def stacked(loras: LayerLoras) -> ops.Stacked:
    hit = loras.cache.get("stacked")
    if hit is None:
        hit = loras.cache["stacked"] = ops.build_stacked(loras.slots, loras.pairs)
    return hit


def choose_method(plan: LoraPlan, loras: LayerLoras) -> str:
    """Pick segments / grouped / stacked by a launch + multiply-add cost model (see benchmarks/ops_bench.py).

    Width is in + out features; costs are in multiply-adds, one launch counting ``op_cost``.
    """
    op = cost(loras)
    width = loras.in_features + loras.out_features
    ranks = loras.ranks
    counts = [plan.counts[i] for i in loras.positions]
    seg = sum(c * r for c, r in zip(counts, ranks, strict=True)) * width + 3 * op * len(counts)
    stack = plan.num_tokens * sum(ranks) * width + 3 * op
    group = 0
    for members, rank in buckets(loras):
        m = max(plan.counts[i] for i in members)
        ragged = any(plan.counts[i] != m for i in members)
        group += len(members) * m * rank * width + (4 + ragged) * op
    best = min(seg, stack, group)
    if best == stack:
        return "stacked"
    return "grouped" if best == group else "segments"
