"""Per-request weighted mixtures of adapters, e.g. ``{"caps": 0.5, "json": 0.5}``, without merging.

A mixture is served as one more adapter in one slot: its ranks are concatenated, so every LoRA term keeps
its own rank and the batched ops need no change. For each module (weights stored as ``A`` [in, r],
``B`` [r, out] with the scaling folded in)::

    A_mix = cat([A_1, ..., A_n], dim=1)      B_mix = cat([w_1 B_1, ..., w_n B_n], dim=0)
    x @ A_mix @ B_mix = sum_i w_i * x @ A_i @ B_i          (the exact weighted sum of the LoRA terms)

which is PEFT's ``add_weighted_adapter(..., combination_type="cat")``. LoRA biases add up weighted. DoRA
(its magnitude scaling is not linear in the adapters) and ``modules_to_save`` (full module copies) cannot be
mixed and are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from blora.lora.config import AdapterError
from blora.lora.prepared import LoraWeights, PreparedAdapter

PREFIX = "mixture:"


@dataclass(frozen=True)
class Mixture:
    """Adapter name -> weight, in name order. ``key`` names it in the engine (one adapter per mixture)."""

    weights: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, spec: dict) -> Mixture:
        if not isinstance(spec, dict) or not spec:
            raise AdapterError(f"an adapter mixture must be a non-empty dict {{name: weight}}, got {spec!r}")
        items = []
        for name, weight in spec.items():
            if not isinstance(name, str) or not name or name.startswith(PREFIX):
                raise AdapterError(f"adapter mixture: component names must be adapter names, got {name!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise AdapterError(
                    f"adapter mixture: weight of {name!r} must be a finite number, got {weight!r}"
                )
            items.append((name, float(weight)))
        return cls(tuple(sorted(items)))

    @classmethod
    def from_key(cls, key: str) -> Mixture:
        try:
            spec = json.loads(key[len(PREFIX) :])
        except json.JSONDecodeError:
            raise AdapterError(f"{key!r} is not a valid adapter mixture name") from None
        return cls.parse(spec)

    @property
    def key(self) -> str:
        return PREFIX + json.dumps(dict(self.weights), separators=(",", ":"))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.weights]


def is_mixture(name: object) -> bool:
    return isinstance(name, dict) or (isinstance(name, str) and name.startswith(PREFIX))


def mixture_key(adapter: str | dict | None) -> str | None:
    """A request's adapter as the engine names it: a mixture dict becomes its canonical key."""
    return Mixture.parse(adapter).key if isinstance(adapter, dict) else adapter


def combine(key: str, parts: list[tuple[PreparedAdapter, float]]) -> PreparedAdapter:
    """One prepared adapter computing ``sum_i w_i * LoRA_i`` (see the module docstring)."""
    for prepared, _ in parts:
        if prepared.uses_dora:
            raise AdapterError(
                f"adapter mixture {key}: {prepared.name!r} is a DoRA adapter; DoRA's magnitude scaling is not "
                "a sum of LoRA terms, so it cannot be mixed (use it alone)"
            )
        if prepared.saved:
            raise AdapterError(
                f"adapter mixture {key}: {prepared.name!r} has modules_to_save (full module copies), which "
                "cannot be mixed (use it alone)"
            )
    modules: dict[str, LoraWeights] = {}
    names = sorted({m for prepared, _ in parts for m in prepared.modules})
    for module in names:
        terms = [(p.modules[module], w) for p, w in parts if module in p.modules]
        if terms[0][0].embedding:
            a = torch.cat([t.a for t, _ in terms], dim=1)
        else:  # keeps the row-major [r, in] storage that ``prepare_module`` gives ``a``
            a = torch.cat([t.a.t() for t, _ in terms], dim=0).t()
        b = torch.cat([t.b * w for t, w in terms], dim=0)
        biases = [t.bias * w for t, w in terms if t.bias is not None]
        bias = torch.stack(biases).sum(0) if biases else None
        modules[module] = LoraWeights(a, b, bias, None, terms[0][0].embedding)
    return PreparedAdapter(name=key, source=key, modules=modules)
