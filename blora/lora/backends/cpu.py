"""The CPU-kernel backend: adapters with few tokens (decode) through the C++ multi-LoRA kernel in one call
per layer (``blora.kernels.CpuKernel.add``), adapters with many tokens (prefill) as PyTorch GEMMs.

"Few": tokens x rank <= ``max_work`` per adapter (``BackendOptions.kernel_max_work`` unless the caller
passes a bound). Inputs the kernel cannot take (another dtype than the weights' float32 / bfloat16, an
output without unit column stride) go through the PyTorch ops, as the ``torch`` backend would run them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch

from blora import kernels
from blora.kernels import KernelTable
from blora.lora import ops
from blora.lora.backends.base import BackendUnavailableError, BoundAdd
from blora.lora.backends.torch_ops import TorchBackend
from blora.lora.plan import LayerLoras, LoraPlan, OutputSlice

if TYPE_CHECKING:
    from blora.lora.backends import BackendOptions


class CpuKernelBackend(TorchBackend):
    name = "cpu"

    def __init__(self, kernel: kernels.CpuKernel, max_work: int = kernels.MAX_WORK) -> None:
        self.kernel = kernel
        self.max_work = max_work

    @classmethod
    def create(cls, options: object = None) -> CpuKernelBackend:
        if options is None:
            raise BackendUnavailableError("the CPU kernel backend needs BackendOptions (device, cpu_kernel)")
        options = cast("BackendOptions", options)
        if options.device.type != "cpu":
            raise BackendUnavailableError(f"the CPU kernel does not run on {options.device}")
        if not options.cpu_kernel:
            raise BackendUnavailableError("the CPU kernel is turned off (cpu_kernel=False)")
        kernel = kernels.get()
        if kernel is None:
            raise BackendUnavailableError("the CPU kernel could not be built (see the warning above)")
        return cls(kernel, options.kernel_max_work)

    def add(
        self, y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras, max_work: int | None = None
    ) -> None:
        if x.dtype != loras.dtype:
            x = x.to(loras.dtype)
        if x.dtype not in kernels.DTYPES or y.stride(1) != 1:
            self.add_ops(y, x, plan, loras)
            return
        table, large = self.split(plan, loras, self.max_work if max_work is None else max_work)
        if table is not None:
            self.kernel.add(y, x if x.stride(1) == 1 else x.contiguous(), table, *plan.flat())
        if large:
            # a column slice of a fused projection: in-place GEMM ops on it would copy the whole slice
            # per adapter, so the deltas go to a dense buffer first (each row gets one delta: same rounding)
            out = y if y.is_contiguous() else y.new_zeros(y.shape)
            if plan.full:
                ops.add_single(out, x, loras.pairs[0])
            else:
                ops.add_segments(
                    out, x, plan.subset([loras.positions[k] for k in large]), [loras.pairs[k] for k in large]
                )
            if out is not y:
                y.add_(out)

    def add_fused(
        self, y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, slices: Sequence[OutputSlice],
        max_work: int | None = None,
    ) -> None:  # fmt: skip
        """At decode every adapter's tokens fit the kernel: the entries of all the projections go to ONE
        kernel call, largest first, each writing its own column range of ``y`` (fewer calls, and the threads
        share out more, smaller pieces of work). Otherwise each projection is added on its own."""
        if not slices:
            return
        bound = self.max_work if max_work is None else max_work
        parts = []
        for s in slices:
            table = self.table(x, plan, s.loras, bound) if y.stride(1) == 1 else None
            if table is None:  # e.g. a prefill-sized adapter: each projection on its own
                for each in slices:
                    self.add(y[:, each.start : each.stop], x, plan, each.loras, bound)
                return
            parts.append((table, s.start))
        key = tuple(parts)
        cache = slices[0].loras.cache
        hit = cache.get("fused")
        # KernelTable compares by identity and the cached key holds its tables alive: the match is exact
        if hit is None or hit[0] != key:
            hit = cache["fused"] = (key, KernelTable.cat([t.at_column(c) for t, c in key]))
        combined = hit[1]
        if len(combined):
            self.kernel.add(y, x if x.stride(1) == 1 else x.contiguous(), combined, *plan.flat())

    def bind(
        self, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras, max_work: int | None = None
    ) -> BoundAdd | None:
        """One kernel call per forward when every adapter's tokens fit the kernel (decode), else None."""
        table = self.table(x, plan, loras, self.max_work if max_work is None else max_work)
        if table is None:
            return None
        return self.kernel.bind_add(table, *plan.flat(), loras.in_features, x.dtype)

    def table(self, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras, bound: int) -> KernelTable | None:
        """This layer's whole LoRA for ``plan`` as one kernel table, or None where the kernel alone cannot
        do it (``x`` not in the weights' kernel dtype, or an adapter with too many tokens)."""
        if x.dtype != loras.dtype or x.dtype not in kernels.DTYPES:
            return None
        table, large = self.split(plan, loras, bound)
        return None if large else table

    def split(self, plan: LoraPlan, loras: LayerLoras, bound: int) -> tuple[KernelTable | None, list[int]]:
        """(kernel table of the adapters with few tokens, or None; indices into ``loras`` of those with many).
        Cached on ``loras`` for the last (plan, bound)."""
        if plan.max_count * loras.max_rank <= bound:  # decode: every adapter, O(1)
            return all_table(loras), []
        hit = loras.cache.get("split")
        if hit is None or hit[0] != (plan.key, bound):
            small: list[int] = []
            large: list[int] = []
            for k, (pos, r) in enumerate(zip(loras.positions, loras.ranks, strict=True)):
                (small if plan.counts[pos] * r <= bound else large).append(k)
            if not small:
                table = None
            elif not large:
                table = all_table(loras)
            else:
                table = kernel_table(loras).select(small).largest_first()
            hit = loras.cache["split"] = ((plan.key, bound), (table, large))
        return hit[1]


def kernel_table(loras: LayerLoras) -> KernelTable:
    """The layer's adapters as kernel entries in ``loras`` order (cached with ``loras``)."""
    hit = loras.cache.get("kernel")
    if hit is None:
        hit = loras.cache["kernel"] = KernelTable.of(loras.pairs, list(loras.positions))
    return hit


def all_table(loras: LayerLoras) -> KernelTable:
    """Every adapter's kernel entries, largest first (cached with ``loras``)."""
    hit = loras.cache.get("kernel_all")
    if hit is None:
        hit = loras.cache["kernel_all"] = kernel_table(loras).largest_first()
    return hit
