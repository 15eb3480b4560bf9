"""The ``LoraBackend`` protocol: the batched LoRA math of one layer over a step's ``LoraPlan``.

A backend is chosen ONCE per engine (``blora.lora.backends.select``) from the device and the config and
rides in the scoped LoRA context with the step's plan; ``LoraLinear`` and the model families call it and
never look at the device. Every method works on device tensors only: shapes and paths come from the plan's
host values (``counts``, ``active``) and the layer's ``LayerLoras`` (ranks), so no method reads a device
tensor back to the host.

Shapes: ``x`` [N, in] the layer input (N = ``plan.num_tokens``), ``y`` [N, out] the base output (it may be
a column slice of a wider fused output), ``loras.pairs[k]`` = (``A`` [in, r_k], ``B`` [r_k, out]) for slot
``loras.slots[k]`` whose tokens are ``plan.index[loras.positions[k]]``; scaling is folded into ``B``.
Tokens whose slot has no weights in ``loras`` (or -1) are left untouched.

``ReferenceBackend`` below is the executable specification: plain PyTorch, one loop per adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from blora.lora.plan import LayerLoras, LoraPlan, OutputSlice

BoundAdd = Callable[[torch.Tensor, torch.Tensor], None]


class BackendUnavailableError(RuntimeError):
    """A backend cannot run here (no kernel build, wrong device): the message says why."""


@runtime_checkable
class LoraBackend(Protocol):
    """Batched multi-LoRA for one layer over one step's plan (see the module docstring for shapes).

    ``max_work`` (``add``, ``add_fused``, ``bind``): a tuning hint from the caller, the tokens x rank per
    adapter under which a backend may prefer its small-batch path; backends without one ignore it.
    """

    name: str

    def shrink(self, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras) -> torch.Tensor:
        """-> ``h`` [N, max_rank] in the weights' dtype.

        Semantics: ``h = zeros(N, R); h[idx_k, :r_k] = x[idx_k] @ A_k`` for each adapter ``k`` of ``loras``.
        """
        ...

    def expand(self, y: torch.Tensor, h: torch.Tensor, plan: LoraPlan, loras: LayerLoras) -> None:
        """In place on ``y`` [N, out]. Semantics: ``y[idx_k] += h[idx_k, :r_k] @ B_k`` for each ``k``."""
        ...

    def add(
        self, y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras, max_work: int | None = None
    ) -> None:
        """In place on ``y`` [N, out]. Semantics: ``expand(y, shrink(x, plan, loras), plan, loras)``, i.e.
        ``y[idx_k] += x[idx_k] @ A_k @ B_k``; ``x`` may be in another dtype than the weights (cast first)."""
        ...

    def add_fused(
        self, y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, slices: Sequence[OutputSlice],
        max_work: int | None = None,
    ) -> None:  # fmt: skip
        """Projections sharing the input ``x`` and one fused output ``y`` [N, sum of widths] (q/k/v,
        gate/up). Semantics: ``add(y[:, s.start:s.stop], x, plan, s.loras)`` for each slice ``s``."""
        ...

    def bind(
        self, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras, max_work: int | None = None
    ) -> BoundAdd | None:
        """``add`` with everything but ``y`` and ``x`` fixed, for a caller that reuses one plan for many
        forwards (library mode's ``generate``): ``f(y, x)`` has the semantics of ``add(y, x, plan, loras)``
        for inputs of ``x``'s dtype and width. None: no cheaper bound form, call ``add``."""
        ...


class ReferenceBackend:
    """The protocol in plain PyTorch: one GEMM pair per adapter, no shape heuristics. Slow; for tests."""

    name = "reference"

    @classmethod
    def create(cls, options: object = None) -> ReferenceBackend:
        return cls()

    def __deepcopy__(self, memo: dict) -> ReferenceBackend:
        return self  # a backend is a shared service, not model state (``copy.deepcopy`` of a model keeps it)

    def shrink(self, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras) -> torch.Tensor:
        x = x.to(loras.dtype)
        h = x.new_zeros(x.shape[0], loras.max_rank)
        for pos, (a, _) in zip(loras.positions, loras.pairs, strict=True):
            idx = plan.index[pos]
            h[idx, : a.shape[1]] = x.index_select(0, idx) @ a
        return h

    def expand(self, y: torch.Tensor, h: torch.Tensor, plan: LoraPlan, loras: LayerLoras) -> None:
        for pos, (_, b) in zip(loras.positions, loras.pairs, strict=True):
            idx = plan.index[pos]
            delta = h.index_select(0, idx)[:, : b.shape[0]] @ b
            y.index_add_(0, idx, delta.to(y.dtype))

    def add(
        self, y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras, max_work: int | None = None
    ) -> None:
        self.expand(y, self.shrink(x, plan, loras), plan, loras)

    def add_fused(
        self, y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, slices: Sequence[OutputSlice],
        max_work: int | None = None,
    ) -> None:  # fmt: skip
        for s in slices:
            self.add(y[:, s.start : s.stop], x, plan, s.loras, max_work)

    def bind(
        self, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras, max_work: int | None = None
    ) -> BoundAdd | None:
        return None
