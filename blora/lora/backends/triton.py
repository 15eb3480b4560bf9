"""The Triton backend: the LoRA math of a layer in two kernel launches (shrink, expand) per step, whatever
the number of adapters, their ranks and the number of fused output slices (``blora.kernels.triton``).

Per step it reads the plan's device tensors as they are (slot per token, tokens grouped by adapter): no
regrouping, no copy, no value read back to the host. Per layer and set of active adapters it builds once
(cached in ``LayerLoras.cache``) a small table of offsets and ranks into the adapters' weights in place.
Segments (SGMV) when adapters have several tokens each on average (prefill, shared adapters), per-token
(BGMV) otherwise. Runs on CUDA, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how it is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blora.kernels import triton as triton_kernels
from blora.lora.backends.base import BackendUnavailableError, BoundAdd, ReferenceBackend
from blora.lora.plan import LayerLoras, LoraPlan, OutputSlice


class TritonBackend(ReferenceBackend):
    """``LoraBackend`` over the Triton SGMV/BGMV kernels (fp32 / fp16 / bf16, float32 accumulation)."""

    name = "triton"

    def __init__(self) -> None:
        from blora.kernels.triton import lora as kernels  # imports triton: only once the backend is chosen

        self._k = kernels
        self._meta: tuple[int, object] | None = None  # (plan.key, LoraKernelMeta) of the last plan

    @classmethod
    def create(cls, options: object = None) -> TritonBackend:
        device = torch.device(getattr(options, "device", "cuda"))
        if not triton_kernels.available(device):
            raise BackendUnavailableError(
                f"the Triton LoRA backend runs on CUDA devices with the triton package installed, or on CPU "
                f"tensors under TRITON_INTERPRET=1 (tests); not on {device}: use lora_backend='auto'"
            )
        return cls()

    def _plan_meta(self, plan: LoraPlan):
        """The kernels' view of the plan: its device tensors as they are, host sizes (cached per plan)."""
        hit = self._meta
        if hit is not None and hit[0] == plan.key:
            return hit[1]
        from blora.kernels.triton.lora_meta import LoraKernelMeta

        meta = LoraKernelMeta(
            token_slot=plan.slots,
            token_idx=plan.rows,
            seg_start=plan.starts,
            seg_len=plan.lengths,
            seg_slot=plan.slot_ids,
            num_tokens=plan.num_tokens,
            num_segments=len(plan.active),
            max_seg_len=plan.max_count,
            active=plan.active,
        )
        self._meta = (plan.key, meta)
        return meta

    def _weights(self, slices: Sequence[OutputSlice], in_features: int, width: int):
        """Offset tables for ``slices`` (cached on the first slice's ``LayerLoras`` while all are current)."""
        from blora.kernels.triton.lora_weights import LoraWeights

        owners = tuple(s.loras for s in slices)
        key = ("triton", tuple((s.start, s.stop) for s in slices), width)
        hit = owners[0].cache.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], owners, strict=True)):
            return hit[1]
        tables = [dict(zip(s.loras.slots, s.loras.pairs, strict=True)) for s in slices]
        outs = [s.stop - s.start for s in slices]
        dtype, device = owners[0].dtype, owners[0].pairs[0][0].device
        w = LoraWeights(tables, in_features, outs, device, dtype, cols=[s.start for s in slices])
        owners[0].cache[key] = (owners, w)
        return w

    def add(
        self, y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras, max_work: int | None = None
    ) -> None:
        self.add_fused(y, x, plan, [OutputSlice(loras, 0, y.shape[1])])

    def add_fused(
        self, y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, slices: Sequence[OutputSlice],
        max_work: int | None = None,
    ) -> None:  # fmt: skip
        slices = [s for s in slices if s.loras.pairs]
        if not slices or not plan.active:
            return
        w = self._weights(slices, x.shape[1], y.shape[1])
        x = x.to(w.dtype)
        if x.stride(-1) != 1:
            x = x.contiguous()
        if y.stride(-1) == 1:
            self._k.add_lora(y, x, w, self._plan_meta(plan))
            return
        out = y.contiguous()
        self._k.add_lora(out, x, w, self._plan_meta(plan))
        y.copy_(out)

    def shrink(self, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras) -> torch.Tensor:
        w = self._weights([OutputSlice(loras, 0, loras.out_features)], x.shape[1], loras.out_features)
        h = torch.zeros(1, plan.num_tokens, loras.max_rank, dtype=torch.float32, device=x.device)
        meta = self._plan_meta(plan)
        if plan.active:
            self._k.sgmv_shrink(x.to(w.dtype).contiguous(), w, meta, h, loras.max_rank)
        return h[0].to(loras.dtype)

    def expand(self, y: torch.Tensor, h: torch.Tensor, plan: LoraPlan, loras: LayerLoras) -> None:
        w = self._weights([OutputSlice(loras, 0, y.shape[1])], loras.in_features, y.shape[1])
        if plan.active:
            self._k.sgmv_expand(y, w, self._plan_meta(plan), h.unsqueeze(0))

    def bind(
        self, x: torch.Tensor, plan: LoraPlan, loras: LayerLoras, max_work: int | None = None
    ) -> BoundAdd | None:
        return None  # ``add`` is already two launches over cached tables: nothing cheaper to bind

    @staticmethod
    def paged_decode_attention(*args, **kwargs) -> torch.Tensor:
        """The Triton paged decode attention (``blora.kernels.triton.attention.paged_decode_attention``),
        for an attention path that runs with this backend."""
        from blora.kernels.triton.attention import paged_decode_attention

        return paged_decode_attention(*args, **kwargs)
