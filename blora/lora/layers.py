"""LoRA-aware wrapper that replaces a targeted ``nn.Linear`` / GPT-2 ``Conv1D`` and holds adapter weights."""

from __future__ import annotations

import torch
from torch import nn

from blora import kernels
from blora.lora import ops
from blora.lora.context import TokenGroups, current_batch

# A layer's decode-time work for one token grouping (see ``LoraLinear._bind``): the CPU kernel bound to its
# table, ``_SKIP`` (no adapter of the batch targets the layer) or None (the general path, ``add_lora``).
_SKIP = object()
_Step = tuple[TokenGroups, int, torch.dtype, object]  # (groups, weights version, input dtype, work)

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


_PLAN_CACHE_SIZE = 2  # each plan holds stacked copies of its adapters: bound that memory


def base_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoraLinear)) or type(module).__name__ == "Conv1D"


class _Plan:
    """Per (active adapters, weights version) cache of stacked weights and of the chosen op."""

    def __init__(
        self, slots: tuple[int, ...], pairs: list[ops.Pair], positions: list[int], op_cost: int
    ) -> None:
        self.slots = slots
        self.pairs = pairs
        self.positions = positions  # index of each slot in TokenGroups.active
        self.ranks = [int(a.shape[1]) for a, _ in pairs]
        self.max_rank = max(self.ranks)
        self.op_cost = op_cost
        self._grouped: list[ops.RankGroup] | None = None
        self._buckets: list[tuple[tuple[int, ...], int]] | None = None
        self._stacked: ops.Stacked | None = None
        self._method: tuple[int, str] | None = None  # (id of the TokenGroups it was chosen for, method)
        self._kernel_pairs: list[ops.Pair] | None = None
        self._kernel_meta: torch.Tensor | None = None
        self._kernel_all: torch.Tensor | None = None  # every adapter through the kernel, largest first
        self._split: tuple[tuple[int, int], tuple] | None = None  # ((id of TokenGroups, bound), result)

    def grouped(self) -> list[ops.RankGroup]:
        if self._grouped is None:
            self._grouped = ops.build_rank_groups(self.positions, self.pairs, merge_below=4 * self.op_cost)
        return self._grouped

    def buckets(self, width: int) -> list[tuple[tuple[int, ...], int]]:
        """(members, padded rank) of the rank groups ``grouped()`` would stack, without stacking."""
        if self._buckets is None:
            buckets = ops.rank_buckets(self.ranks, width, merge_below=4 * self.op_cost)
            self._buckets = [
                (tuple(self.positions[i] for i in b), max(self.ranks[i] for i in b)) for b in buckets
            ]
        return self._buckets

    def stacked(self) -> ops.Stacked:
        if self._stacked is None:
            self._stacked = ops.build_stacked(self.slots, self.pairs)
        return self._stacked

    def kernel_meta(self) -> torch.Tensor:
        """The CPU kernel's per-adapter table; the plan holds the (re-laid-out, if needed) weights alive."""
        if self._kernel_meta is None:
            self._kernel_pairs = [kernels.kernel_layout(a, b) for a, b in self.pairs]
            self._kernel_meta = kernels.kernel_meta(self._kernel_pairs, self.positions)
        return self._kernel_meta

    def _all_table(self) -> torch.Tensor:
        """Every adapter's kernel entries, largest first (cached with the plan)."""
        if self._kernel_all is None:
            self._kernel_all = kernels.largest_first(self.kernel_meta())
        return self._kernel_all

    def kernel_split(
        self, groups: TokenGroups, max_work: int | None = None
    ) -> tuple[torch.Tensor | None, list[int]]:
        """(kernel table of the adapters with few tokens, or None; plan indices of those with many).
        "Few": tokens x rank <= ``max_work`` (default ``kernels.MAX_WORK``)."""
        bound = kernels.MAX_WORK if max_work is None else max_work
        if groups.max_count * self.max_rank <= bound:  # decode: every adapter, O(1)
            return self._all_table(), []
        if self._split is None or self._split[0] != (id(groups), bound):
            small, large = [], []
            for k, (pos, r) in enumerate(zip(self.positions, self.ranks, strict=True)):
                (small if groups.counts[pos] * r <= bound else large).append(k)
            if not small:
                table = None
            elif not large:
                table = self._all_table()
            else:
                table = kernels.largest_first(
                    self.kernel_meta().index_select(0, torch.tensor(small, dtype=torch.long))
                )
            self._split = ((id(groups), bound), (table, large))
        return self._split[1]

    def method(self, groups: TokenGroups, width: int) -> str:
        if self._method is None or self._method[0] != id(groups):
            self._method = (id(groups), choose_method(groups, self, width))
        return self._method[1]


class LoraLinear(nn.Module):
    """``y = base(x) + scale_a * B_a(A_a x)`` with ``a`` the slot of each token in the current ``lora_batch``.

    Tokens with slot -1, or whose adapter does not target this module, get exactly ``base(x)``.
    A slot may also carry a LoRA bias and DoRA's per-output scale ``g``: its tokens get
    ``g * (base(x) - bias) + bias + x A B' + b'`` with ``g`` folded into ``B'`` and ``b'`` at load time.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base_features(base)
        self.pairs: dict[int, ops.Pair] = {}
        self.extras: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}  # slot -> (g, c)
        self.version = 0
        self._plans: dict[tuple[tuple[int, ...], int], _Plan] = {}
        self._step: _Step | None = None  # the work bound for the last token grouping seen (``_bind``)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def set_lora(
        self,
        slot: int,
        a_t: torch.Tensor,
        b_t: torch.Tensor,
        bias: torch.Tensor | None = None,
        dora_scale: torch.Tensor | None = None,
    ) -> None:
        """Install slot's weights: ``a_t`` [in, r], ``b_t`` [r, out] with the scaling (and DoRA's ``g``)
        folded in; ``bias`` [out]: the LoRA bias, scaled likewise; ``dora_scale`` [out]: DoRA's ``g``."""
        self.pairs[slot] = (a_t, b_t)
        self.extras.pop(slot, None)
        if bias is not None or dora_scale is not None:
            shift = bias
            base_bias = self.base.bias
            if dora_scale is not None and base_bias is not None:
                shift = base_bias.detach() * (1 - dora_scale) + (0 if bias is None else bias)
            self.extras[slot] = (dora_scale, shift)
        self._invalidate()

    def reset_lora(self, slot: int) -> None:
        self.extras.pop(slot, None)
        if self.pairs.pop(slot, None) is not None:
            self._invalidate()

    def _invalidate(self) -> None:
        self.version += 1
        self._plans.clear()
        self._step = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = current_batch()
        if batch is None or not batch.any_adapter or not self.pairs:
            return y
        x = x.reshape(-1, self.in_features)
        groups = batch.groups(x.shape[0])
        step = self._step
        if step is None or step[0] is not groups or step[1] != self.version or step[2] is not x.dtype:
            step = self._bind(groups, x)
        work = step[3]
        if work is None:
            self.add_lora(y.view(-1, self.out_features), x)
        elif work is not _SKIP:
            work(y.view(-1, self.out_features), x)
        return y

    def _bind(self, groups: TokenGroups, x: torch.Tensor) -> _Step:
        """This layer's work for ``groups``, decided once per token grouping (library mode's ``generate``
        reuses one grouping for every decode step): the CPU kernel bound to its table when every adapter's
        tokens fit it, so each later forward is one kernel call; otherwise the general ``add_lora``."""
        plan = self._plan(groups)
        work: object = None
        if plan is None:
            work = _SKIP
        elif not self.extras and (kernel := kernels.usable(x, plan.pairs[0][0].dtype)) is not None:
            table, large = plan.kernel_split(groups)
            if table is not None and not large:
                work = kernel.bind_add(table, *groups.flat(), self.in_features, x.dtype)
                work.keep = plan  # the table points into the plan's weights
        self._step = (groups, self.version, x.dtype, work)
        return self._step

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, max_work: int | None = None) -> None:
        """In place on ``y`` [N, out] = ``base(x)`` for ``x`` [N, in] (``y`` may be a column slice of a wider
        output, as in a fused projection): the LoRA (and DoRA / LoRA bias) of each token's slot in the
        current ``lora_batch``; nothing outside one. ``max_work``: the CPU kernel's
        tokens x rank bound per adapter (default ``kernels.MAX_WORK``; above it, GEMMs).
        """
        batch = current_batch()
        if batch is None or not self.pairs or not batch.any_adapter:
            return
        groups = batch.groups(x.shape[0])
        plan = self._plan(groups)
        if plan is None:
            return
        if self.extras:
            self._apply_extras(y, groups, plan)
        w_dtype = plan.pairs[0][0].dtype
        self._apply(y, x if x.dtype == w_dtype else x.to(w_dtype), groups, plan, max_work)

    def kernel_table(
        self, x: torch.Tensor, groups: TokenGroups, max_work: int | None = None
    ) -> torch.Tensor | None:
        """This layer's whole LoRA for ``groups`` as CPU kernel entries (``kernels.kernel_meta``, output from
        column 0; zero rows when no token's adapter targets it), for a caller that batches several layers
        sharing ``x`` into one kernel call. None where the kernel alone cannot do it: no kernel for ``x``,
        DoRA / LoRA-bias extras, or an adapter with many tokens (GEMMs): then use ``add_lora``."""
        plan = self._plan(groups)
        if plan is None:
            return _NO_ENTRIES
        if self.extras or kernels.usable(x, plan.pairs[0][0].dtype) is None:
            return None
        table, large = plan.kernel_split(groups, max_work)
        return None if large else table

    def _apply_extras(self, y: torch.Tensor, groups: TokenGroups, plan: _Plan) -> None:
        """DoRA scale and LoRA bias: ``y[t] = g * y[t] + c`` for the tokens of slots that have them."""
        for slot, pos in zip(plan.slots, plan.positions, strict=True):
            extra = self.extras.get(slot)
            if extra is None:
                continue
            scale, shift = extra
            rows = y if groups.full else y.index_select(0, groups.index[pos])
            if scale is not None:
                rows.mul_(scale)
            if shift is not None:
                rows.add_(shift)
            if not groups.full:
                y.index_copy_(0, groups.index[pos], rows)

    def _plan(self, groups: TokenGroups) -> _Plan | None:
        key = (groups.active, self.version)
        plan = self._plans.get(key)
        if plan is None:
            positions = [i for i, s in enumerate(groups.active) if s in self.pairs]
            if not positions:
                return None
            slots = tuple(groups.active[i] for i in positions)
            pairs = [self.pairs[s] for s in slots]
            plan = _Plan(slots, pairs, positions, op_cost(pairs[0][0].device.type, pairs[0][0].dtype))
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan

    def _apply(
        self, y: torch.Tensor, x: torch.Tensor, groups: TokenGroups, plan: _Plan, max_work: int | None = None
    ) -> None:
        kernel = kernels.usable(x, plan.pairs[0][0].dtype) if y.stride(1) == 1 else None
        if kernel is not None:
            # CPU: adapters with few tokens (decode) in one kernel call, those with many (prefill) as GEMMs
            table, large = plan.kernel_split(groups, max_work)
            if table is not None:
                kernel.add(y, x if x.stride(1) == 1 else x.contiguous(), table, *groups.flat())
            if large:
                # a column slice of a fused projection: in-place GEMM ops on it would copy the whole slice
                # per adapter, so the deltas go to a dense buffer first (each row gets one delta: same rounding)
                out = y if y.is_contiguous() else y.new_zeros(y.shape)
                if groups.full:
                    ops.add_single(out, x, plan.pairs[0])
                else:
                    sub = _subset(groups, [plan.positions[k] for k in large])
                    ops.add_segments(out, x, sub, [plan.pairs[k] for k in large])
                if out is not y:
                    y.add_(out)
            return
        if groups.full:
            ops.add_single(y, x, plan.pairs[0])
            return
        method = plan.method(groups, self.in_features + self.out_features)
        if method == "stacked":
            ops.add_stacked(y, x, groups, plan.stacked())
        elif method == "grouped":
            ops.add_grouped(y, x, groups, plan.grouped())
        else:
            sub = groups if len(plan.positions) == len(groups.active) else _subset(groups, plan.positions)
            ops.add_segments(y, x, sub, plan.pairs)


_NO_ENTRIES = torch.empty(0, 6, dtype=torch.long)


def _subset(groups: TokenGroups, positions: list[int]) -> TokenGroups:
    return TokenGroups(
        slots=groups.slots,
        active=tuple(groups.active[i] for i in positions),
        index=[groups.index[i] for i in positions],
        counts=[groups.counts[i] for i in positions],
        full=False,
    )


def choose_method(groups: TokenGroups, plan: _Plan, width: int) -> str:
    """Pick segments / grouped / stacked by a launch + multiply-add cost model (see benchmarks/ops_bench.py).

    ``width`` is in + out features; costs are in multiply-adds, one launch counting ``plan.op_cost``.
    """
    op = plan.op_cost
    counts = [groups.counts[i] for i in plan.positions]
    seg = sum(c * r for c, r in zip(counts, plan.ranks, strict=True)) * width + 3 * op * len(counts)
    stacked = groups.slots.numel() * sum(plan.ranks) * width + 3 * op
    grouped = 0
    for members, rank in plan.buckets(width):
        m = max(groups.counts[i] for i in members)
        ragged = any(groups.counts[i] != m for i in members)
        grouped += len(members) * m * rank * width + (4 + ragged) * op
    best = min(seg, stacked, grouped)
    if best == stacked:
        return "stacked"
    return "grouped" if best == grouped else "segments"
