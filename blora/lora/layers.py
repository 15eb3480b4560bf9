"""LoRA-aware wrapper that replaces a targeted ``nn.Linear`` / GPT-2 ``Conv1D`` and holds adapter weights."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from blora.lora import ops
from blora.lora.backends import LoraBackend
from blora.lora.context import current_batch
from blora.lora.plan import LayerLoras, LoraPlan, OutputSlice
from blora.models.families.packing import Packed

logger = logging.getLogger("blora")

# A layer's work for one plan (see ``LoraLinear._bind``): the backend's bound form, ``_SKIP`` (no adapter of
# the plan targets the layer) or None (the general path, ``add_lora``).
_SKIP = object()
# (plan, weights version, input dtype, backend, work: a bound callable(y, x), _SKIP or None)
_Step = tuple[LoraPlan, int, torch.dtype, LoraBackend, Any]

# each entry may hold stacked copies of its adapters (backend caches): bound that memory
_LORAS_CACHE_SIZE = 2
# base weight dtypes the oneDNN prepacked GEMM (``Packed``) takes
_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def base_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight [in, out])."""
    # Conv1D and QuantizedLinear are matched by class name (no import of transformers' or the quantized
    # module here), so their attributes are read untyped
    layer: Any = module
    if isinstance(module, nn.Linear) or type(module).__name__ == "QuantizedLinear":  # blora.models.quant
        return int(layer.in_features), int(layer.out_features)
    if type(module).__name__ == "Conv1D":
        rows, cols = layer.weight.shape
        return int(rows), int(cols)
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def base_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device of a base layer (or of the one a wrapper holds), without reading the weight of a
    ``QuantizedLinear`` (``blora.models.quant``), whose ``weight`` is a dequantized copy."""
    base: Any = getattr(module, "base", module)  # a Linear, Conv1D or QuantizedLinear (matched by name)
    if type(base).__name__ == "QuantizedLinear":
        return base.dtype, base.qweight.device
    return base.weight.dtype, base.weight.device


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoraLinear)) or type(module).__name__ in (
        "Conv1D",
        "QuantizedLinear",
    )


class LoraLinear(nn.Module):
    """``y = base(x) + scale_a * B_a(A_a x)`` with ``a`` the slot of each token in the current ``lora_batch``.

    Tokens with slot -1, or whose adapter does not target this module, get exactly ``base(x)``.
    A slot may also carry a LoRA bias and DoRA's per-output scale ``g``: its tokens get
    ``g * (base(x) - bias) + bias + x A B' + b'`` with ``g`` folded into ``B'`` and ``b'`` at load time.

    ``pack()`` (library mode, ``load_loras(packed_weights=True)``): ``base(x)`` of a plain CPU ``nn.Linear``
    then runs on a oneDNN-prepacked copy of its weight (``Packed``; a second copy: ``base.weight`` stays as
    it is for PEFT merges, DoRA and dtype checks), which ``F.linear`` would re-lay out on every call.
    Held while the wrapper holds adapters; re-made after ``copy.deepcopy`` (an opaque oneDNN tensor cannot
    be copied) or an in-place change of the weight.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base: Any = base  # nn.Linear, GPT-2 Conv1D or QuantizedLinear (``base_features``)
        self.in_features, self.out_features = base_features(base)
        self.pairs: dict[int, ops.Pair] = {}
        self.extras: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}  # slot -> (g, c)
        self.version = 0
        self._loras: dict[tuple[tuple[int, ...], int], LayerLoras] = {}
        self._step: _Step | None = None  # the work bound for the last plan seen (``_bind``)
        self.pack_base = False  # base(x) through ``packed`` (``pack``)
        self.packed: torch.Tensor | None = None  # the prepacked base weight, made from ``_packed_of``
        self._packed_of: tuple[int, int, torch.dtype] | None = None  # weight (data_ptr, _version, dtype)
        self.shared: SharedInput | None = None  # library mode: projections called on the same input
        self.shared_index = 0  # this wrapper's place in ``shared.members``

    def __getstate__(self) -> dict[str, Any]:  # ``copy.deepcopy`` / pickle: the copy packs its own weight
        state = self.__dict__.copy()
        state["packed"], state["_packed_of"] = None, None
        state["_step"], state["_loras"] = None, {}  # bound kernel calls (ctypes) and caches: re-made on use
        return state

    def packable(self) -> bool:
        """Whether ``pack`` applies: a plain ``nn.Linear`` on CPU in float32 / bfloat16, without hooks or a
        replaced ``forward`` (accelerate's offloading) that running its GEMM directly would skip."""
        base = self.base
        return (
            type(base) is nn.Linear
            and base.weight.device.type == "cpu"
            and base.weight.dtype in _PACKABLE_DTYPES
            and not base._forward_hooks
            and not base._forward_pre_hooks
            and "forward" not in base.__dict__
        )

    @property
    def packed_nbytes(self) -> int:
        """Memory a packed copy of the base weight takes (as much as the weight)."""
        weight = self.base.weight
        return int(weight.numel() * weight.element_size())

    def pack(self) -> bool:
        """Run ``base(x)`` through a prepacked copy of the weight, made now; False (and the plain path)
        where the layer is not ``packable`` or this torch build lacks the oneDNN op."""
        if not self.packable():
            self.unpack()
            return False
        self.pack_base = True
        return self._repack()

    def unpack(self) -> None:
        """Back to ``base(x)``; the packed copy is freed."""
        self.pack_base, self.packed, self._packed_of = False, None, None

    def _repack(self) -> bool:
        weight = self.base.weight
        try:
            with torch.no_grad():
                self.packed = Packed.of(weight)
        except (RuntimeError, AttributeError, NotImplementedError) as exc:  # op missing in this torch build
            logger.info("blora: no prepacked LoRA base weights (%s)", exc)
            self.unpack()
            return False
        self._packed_of = (weight.data_ptr(), weight._version, weight.dtype)
        return True

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)``, on the packed weight where it applies to this call."""
        if not self.pack_base:
            return self.base(x)
        # ``_modules`` / ``_parameters``, not attributes: ``nn.Module.__getattr__`` is slow per call
        base: Any = self._modules["base"]
        weight: torch.Tensor = base._parameters["weight"]
        if (
            x.dtype is not weight.dtype
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))  # no autograd there
            or base._forward_hooks
            or base._forward_pre_hooks
        ):
            return self.base(x)
        if self._packed_of != (weight.data_ptr(), weight._version, weight.dtype) and not self.pack():
            return self.base(x)  # first call after a copy, or the weight changed, and it no longer packs
        x2d = x.reshape(-1, self.in_features)
        y = Packed.linear(x2d, self.packed, weight, base._parameters.get("bias"))
        return y.view(*x.shape[:-1], self.out_features)

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
        """Remove slot's weights; the last one gone also frees the packed base weight (``pack``)."""
        self.extras.pop(slot, None)
        if self.pairs.pop(slot, None) is not None:
            self._invalidate()
        if not self.pairs:
            self.unpack()

    def _invalidate(self) -> None:
        self.version += 1
        self._loras.clear()
        self._step = None
        if self.shared is not None:
            self.shared.changed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared
        if shared is not None and (out := shared.output(self, x)) is not None:
            return out
        y = self._base(x)
        batch = current_batch()
        if batch is None or not batch.any_adapter or not self.pairs:
            return y
        x = x.reshape(-1, self.in_features)
        plan = batch.plan(x.shape[0])
        step = self._step
        if (
            step is None
            or step[0] is not plan
            or step[1] != self.version
            or step[2] is not x.dtype
            or step[3] is not batch.backend
        ):
            step = self._bind(batch.backend, plan, x)
        work = step[4]
        if work is None:
            self.add_lora(y.view(-1, self.out_features), x)
        elif work is not _SKIP:
            work(y.view(-1, self.out_features), x)
        return y

    def _bind(self, backend: LoraBackend, plan: LoraPlan, x: torch.Tensor) -> _Step:
        """This layer's work for ``plan``, decided once per plan (library mode's ``generate`` reuses one plan
        for every decode step): the backend's bound form where it has one (the CPU kernel bound to its
        table: each later forward is one kernel call); otherwise the general ``add_lora``."""
        loras = self.loras(plan)
        work: Any = None
        if loras is None:
            work = _SKIP
        elif not self.extras:
            work = backend.bind(x, plan, loras)
        self._step = (plan, self.version, x.dtype, backend, work)
        return self._step

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, max_work: int | None = None) -> None:
        """In place on ``y`` [N, out] = ``base(x)`` for ``x`` [N, in] (``y`` may be a column slice of a wider
        output, as in a fused projection): the LoRA (and DoRA / LoRA bias) of each token's slot in the
        current ``lora_batch``; nothing outside one. ``max_work``: the backend's small-batch bound hint."""
        batch = current_batch()
        if batch is None or not self.pairs or not batch.any_adapter:
            return
        plan = batch.plan(x.shape[0])
        loras = self.loras(plan)
        if loras is None:
            return
        if self.extras:
            self._apply_extras(y, plan, loras)
        batch.backend.add(y, x, plan, loras, max_work)

    def output_slice(self, plan: LoraPlan, start: int, stop: int) -> OutputSlice | None:
        """This layer's LoRA writing columns ``[start, stop)`` of a fused output, for
        ``LoraBackend.add_fused``; None when no adapter of ``plan`` targets it. Only for layers without
        DoRA / LoRA-bias extras (``has_extras``): those go through ``add_lora``."""
        loras = self.loras(plan)
        return None if loras is None else OutputSlice(loras, start, stop)

    @property
    def has_extras(self) -> bool:
        return bool(self.extras)

    def _apply_extras(self, y: torch.Tensor, plan: LoraPlan, loras: LayerLoras) -> None:
        """DoRA scale and LoRA bias: ``y[t] = g * y[t] + c`` for the tokens of slots that have them."""
        for slot, pos in zip(loras.slots, loras.positions, strict=True):
            extra = self.extras.get(slot)
            if extra is None:
                continue
            scale, shift = extra
            rows = y if plan.full else y.index_select(0, plan.index[pos])
            if scale is not None:
                rows.mul_(scale)
            if shift is not None:
                rows.add_(shift)
            if not plan.full:
                y.index_copy_(0, plan.index[pos], rows)

    def loras(self, plan: LoraPlan) -> LayerLoras | None:
        """This layer's adapters among ``plan``'s active slots (cached per active set and weights version);
        None when none of them targets this layer."""
        key = (plan.active, self.version)
        loras = self._loras.get(key)
        if loras is None:
            positions = tuple(i for i, s in enumerate(plan.active) if s in self.pairs)
            if not positions:
                return None
            slots = tuple(plan.active[i] for i in positions)
            pairs = [self.pairs[s] for s in slots]
            loras = LayerLoras(slots, positions, pairs, self.in_features, self.out_features)
            if len(self._loras) >= _LORAS_CACHE_SIZE:
                self._loras.pop(next(iter(self._loras)))
            self._loras[key] = loras
        return loras


def add_fused_lora(
    y: torch.Tensor, x: torch.Tensor, parts: Sequence[tuple[nn.Module, int, int]], max_work: int | None = None
) -> None:
    """LoRA of the projections ``parts`` ((module, start, stop) columns of ``y`` [N, sum of widths]) sharing
    the input ``x`` [N, in], in the current ``lora_batch``: one ``LoraBackend.add_fused`` call (at decode,
    one CPU kernel call for q/k/v or gate/up); wrappers with DoRA / LoRA-bias extras add their own part.
    Modules that are not LoRA wrappers, or hold no adapter, are skipped."""
    batch = current_batch()
    if batch is None or not batch.any_adapter:
        return
    lora = [(m, lo, hi) for m, lo, hi in parts if isinstance(m, LoraLinear) and m.pairs]
    if not lora:
        return
    if any(m.extras for m, _, _ in lora):
        for module, lo, hi in lora:
            module.add_lora(y[:, lo:hi], x, max_work)
        return
    plan = batch.plan(x.shape[0])
    slices = [s for m, lo, hi in lora if (s := m.output_slice(plan, lo, hi)) is not None]
    batch.backend.add_fused(y, x, plan, slices, max_work)


# Sibling projections that transformers' decoder layers call on one input tensor: attention q/k/v, MLP gate/up
SHARED_INPUT_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInput:
    """Library mode's wrappers of projections a model calls on the same input (``SHARED_INPUT_NAMES``).

    The first of them called on ``x`` runs the base GEMMs of all of them as one GEMM on a prepacked
    concatenated weight (their own prepacked copies are dropped: no extra memory) and their LoRA in one
    backend call (``LoraBackend.add_fused``: at decode, one CPU kernel call for q/k/v), returns its own
    columns and keeps the others' (column views of one output). A kept result is handed out once, and only
    to its projection's call on the same tensor object, unchanged since (version counter), in the same
    ``lora_batch`` with the same weights (any ``set_lora`` / ``reset_lora`` drops it); any other call
    computes afresh, so a model that calls the projections on different inputs, in another order or twice
    gets the results of calling them one by one. Calls the fused path cannot take (autograd, another
    dtype, an inference-mode tensor, which has no version counter, base hooks) run the wrapper's own path,
    which then packs its own weight copy on first use.
    """

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self.bases: list[nn.Linear] = [m.base for m in members]
        self.widths = [m.out_features for m in members]
        self.parts: list[tuple[nn.Module, int, int]] = []  # (member, its first and end column of the output)
        start = 0
        for member, width in zip(members, self.widths, strict=True):
            self.parts.append((member, start, start + width))
            start += width
        self.in_features = members[0].in_features
        self.dtype = members[0].base.weight.dtype
        self.packed: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._packed_of: list[tuple[torch.Tensor | None, int, int]] = []  # (param, data_ptr, _version)
        self.forget()

    def __getstate__(self) -> dict[str, Any]:  # ``copy.deepcopy`` / pickle: the copy packs its own weight
        state = self.__dict__.copy()
        state.update(packed=None, bias=None, _packed_of=[], _x=None, _batch=None, _kept={})
        return state

    @classmethod
    def group(cls, members: list[LoraLinear]) -> SharedInput | None:
        """A group over ``members`` (their own prepacked copies are freed), or None where they do not all
        run prepacked base weights of one dtype and input width or the weights cannot be packed."""
        if len(members) < 2 or any(not m.pack_base or not m.packable() for m in members):
            return None
        first = members[0]
        if any(m.in_features != first.in_features or m.weight.dtype != first.weight.dtype for m in members):
            return None
        shared = cls(members)
        if not shared.repack():
            return None
        for i, m in enumerate(members):
            m.shared, m.shared_index = shared, i
            m.packed, m._packed_of = None, None  # re-made by ``LoraLinear._base`` if a call falls back to it
        return shared

    def _params(self) -> list[torch.Tensor | None]:
        params: list[torch.Tensor | None] = []
        for base in self.bases:  # read from ``_parameters``: ``nn.Module.__getattr__`` is slow per call
            params += [base._parameters["weight"], base._parameters.get("bias")]
        return params

    def _current(self) -> bool:
        """Whether the packed weight and bias were made from the bases' parameters as they are now."""
        params = self._params()
        if len(params) != len(self._packed_of):
            return False
        for param, (made_of, ptr, version) in zip(params, self._packed_of, strict=True):
            if param is not made_of or (
                param is not None and (param._version != version or param.data_ptr() != ptr)
            ):
                return False
        return True

    def repack(self) -> bool:
        """(Re)make the concatenated prepacked weight (and bias); False where it cannot be made."""
        bases = self.bases
        try:
            with torch.no_grad():
                self.packed = Packed.of(torch.cat([b.weight.detach() for b in bases]))
        except (RuntimeError, AttributeError, NotImplementedError) as exc:  # op missing in this torch build
            logger.info("blora: no prepacked shared-input weights (%s)", exc)
            self.packed = None
            return False
        self.bias = None
        if any(b.bias is not None for b in bases):
            self.bias = torch.cat(
                [b.bias.detach() if b.bias is not None else b.weight.new_zeros(b.out_features) for b in bases]
            )
        self._packed_of = [
            (p, -1, -1) if p is None else (p, p.data_ptr(), p._version) for p in self._params()
        ]
        return True

    def forget(self) -> None:
        """Drop the kept results (and the input they were made from)."""
        self._x: torch.Tensor | None = None
        self._version = -1
        self._batch: Any = None
        self._kept: dict[int, torch.Tensor] = {}

    def changed(self) -> None:
        """A member's adapters changed: drop the kept results."""
        self.forget()

    def output(self, member: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``member(x)``: its kept result when it was made from this very ``x``, else all members' results
        made now (``member``'s returned, the others' kept); None where the fused path does not apply."""
        index = member.shared_index
        kept = self._kept.pop(index, None)
        if (
            kept is not None
            and x is self._x
            and not x.is_inference()
            and x._version == self._version
            and current_batch() is self._batch
        ):
            if not self._kept:
                self._x = self._batch = None  # every result handed out: hold nothing
            return kept
        if (
            x.dtype is not self.dtype
            or x.is_inference()
            or torch.is_grad_enabled()
            or x.shape[-1] != self.in_features
            or x.device.type != "cpu"
            or not self._plain()
        ):
            self.forget()
            return None
        if (self.packed is None or not self._current()) and not self.repack():
            self.forget()
            return None
        assert self.packed is not None  # made by ``repack`` above
        x2d = x.reshape(-1, self.in_features)
        y = Packed.matmul(x2d, self.packed, self.bias)
        add_fused_lora(y, x2d, self.parts)
        outs = y.view(*x.shape[:-1], y.shape[-1]).split(self.widths, -1)
        self._x, self._version, self._batch = x, x._version, current_batch()
        self._kept = {i: out for i, out in enumerate(outs) if i != index}
        return outs[index]

    def _plain(self) -> bool:
        """No hooks on the base layers (the fused GEMM would skip them); every member still packed."""
        for member, base in zip(self.members, self.bases, strict=True):
            if base._forward_hooks or base._forward_pre_hooks or not member.pack_base:
                return False
        return True


def share_inputs(model: nn.Module) -> int:
    """Group the model's wrapped ``SHARED_INPUT_NAMES`` siblings that run prepacked base weights
    (``SharedInput``), replacing any earlier groups; a wrapper left out of every group packs its own weight
    again. Returns how many groups there are."""
    released = [m for m in model.modules() if isinstance(m, LoraLinear) and m.shared is not None]
    for wrapper in released:
        wrapper.shared = None
    count = 0
    for module in model.modules():
        children = module._modules
        for names in SHARED_INPUT_NAMES:
            wrappers = [m for n in names if isinstance(m := children.get(n), LoraLinear)]
            if SharedInput.group(wrappers) is not None:  # two or more of them wrapped
                count += 1
    for wrapper in released:
        if wrapper.shared is None and wrapper.pack_base and wrapper.packed is None:
            wrapper.pack()
    return count
