"""Adapter slots on one model: validate, wrap targeted modules, install and remove adapter weights."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from blora.lora.config import AdapterError
from blora.lora.layers import LoraLinear, base_features, is_linear
from blora.lora.weights import AdapterFiles, read_adapter

log = logging.getLogger(__name__)


@dataclass
class AdapterInfo:
    """A loaded adapter: its slot, where it came from, and what it touches."""

    name: str
    slot: int
    source: str
    modules: tuple[str, ...]
    ranks: dict[str, int]
    num_params: int

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())


# (module name, A^T [in, r], B^T * scale [r, out])
_Prepared = list[tuple[str, torch.Tensor, torch.Tensor]]


@dataclass
class PreparedAdapter:
    """A validated adapter ready to install into a slot: per-module ``(name, A^T, B^T * scale)``.

    Built by ``LoraManager.prepare`` without touching the model, so it can be made in a background thread
    and kept in a CPU cache; ``install`` moves the tensors to the model's device.
    """

    name: str
    source: str
    modules: _Prepared
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for _, a, b in self.modules
        )


class LoraManager:
    """Holds any number of adapters beside one base model, each in its own slot.

    ``load`` validates everything before touching the model, so a failed load leaves the model and the
    adapters already loaded untouched.
    """

    def __init__(self, model: nn.Module, *, max_rank: int | None = None) -> None:
        self.model = model
        self.max_rank = max_rank
        self.adapters: dict[str, AdapterInfo] = {}
        self._wrappers: dict[str, LoraLinear] = {}
        self._tree_lock = threading.Lock()  # module-tree changes (wrapping) vs. ``prepare`` in other threads

    def __getstate__(self) -> dict:  # ``copy.deepcopy`` of the model: locks are not copyable
        state = self.__dict__.copy()
        state.pop("_tree_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tree_lock = threading.Lock()

    @classmethod
    def attach(cls, model: nn.Module) -> LoraManager:
        """The model's manager, created on first use (``copy.deepcopy`` of the model copies it along)."""
        manager = model.__dict__.get("_blora_manager")
        if manager is None:
            manager = cls(model)
            object.__setattr__(model, "_blora_manager", manager)
        return manager

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def names(self) -> list[str]:
        return list(self.adapters)

    def slot(self, name: str) -> int:
        try:
            return self.adapters[name].slot
        except KeyError:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {self.names()}") from None

    def load(self, name: str, source: str | Path, *, max_rank: int | None = None) -> int:
        """Read, validate and install an adapter; returns its slot."""
        return self.load_many([(name, source)], max_rank=max_rank)[0]

    def load_many(self, items: list[tuple[str, str | Path]], *, max_rank: int | None = None) -> list[int]:
        """Load several adapters atomically: all are validated before any is installed.

        ``max_rank`` (this call only) defaults to the manager's ``max_rank``.
        """
        names = [name for name, _ in items]
        for name in names:
            if not isinstance(name, str) or not name:
                raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
            if name in self.adapters:
                raise AdapterError(
                    f"adapter {name!r} is already loaded (from {self.adapters[name].source}); "
                    "unload it first or pick another name"
                )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise AdapterError(f"duplicate adapter names {dupes}; each adapter needs its own name")
        prepared = [self.prepare(name, source, max_rank=max_rank) for name, source in items]
        return [self.install(p) for p in prepared]

    def prepare(
        self,
        name: str,
        source: str | Path,
        *,
        max_rank: int | None = None,
        device: torch.device | str | None = None,
    ) -> PreparedAdapter:
        """Read and validate an adapter without changing the model (safe from another thread).

        ``device``: where the prepared tensors live (default: the model's device); ``install`` moves them.
        """
        limit = self.max_rank if max_rank is None else max_rank
        modules = self._validate(read_adapter(name, source), limit, device)
        return PreparedAdapter(name=name, source=str(source), modules=modules)

    def install(self, prepared: PreparedAdapter) -> int:
        """Put a prepared adapter into a free slot; returns the slot."""
        name = prepared.name
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} is already loaded; unload it first or pick another name")
        return self._install(name, prepared.source, prepared.modules)

    def _install(self, name: str, source: str | Path, prepared: _Prepared) -> int:
        slot = self._free_slot()
        for module_name, a_t, b_t in prepared:
            wrapper = self._wrap(module_name)
            weight = wrapper.weight
            a_t = a_t.to(device=weight.device, non_blocking=True)
            b_t = b_t.to(device=weight.device, non_blocking=True)
            wrapper.set_lora(slot, a_t, b_t)
        self.adapters[name] = AdapterInfo(
            name=name,
            slot=slot,
            source=str(source),
            modules=tuple(m for m, _, _ in prepared),
            ranks={m: int(a.shape[1]) for m, a, _ in prepared},
            num_params=sum(a.numel() + b.numel() for _, a, b in prepared),
        )
        return slot

    def export(self, name: str) -> PreparedAdapter:
        """The installed weights of ``name`` as a ``PreparedAdapter`` (shares the tensors)."""
        info = self.adapters[name]
        modules = [(m, *self._wrappers[m].pairs[info.slot]) for m in info.modules]
        return PreparedAdapter(name=name, source=info.source, modules=modules)

    def unload(self, name: str) -> None:
        info = self.adapters.pop(name, None)
        if info is None:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {self.names()}")
        for module_name in info.modules:
            self._wrappers[module_name].reset_lora(info.slot)

    def _free_slot(self) -> int:
        used = {info.slot for info in self.adapters.values()}
        slot = 0
        while slot in used:
            slot += 1
        return slot

    def _wrap(self, module_name: str) -> LoraLinear:
        wrapper = self._wrappers.get(module_name)
        if wrapper is None:
            parent_name, _, child = module_name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            wrapper = LoraLinear(getattr(parent, child))
            with self._tree_lock:
                setattr(parent, child, wrapper)
            self._wrappers[module_name] = wrapper
        return wrapper

    def _linear_modules(self) -> dict[str, nn.Module]:
        """Linear layers PEFT's 'all-linear' would target: all but the output head and our inner layers."""
        out = {}
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        for name, module in self.model.named_modules():
            if name.endswith(".base") and isinstance(
                self.model.get_submodule(name.rpartition(".")[0]), LoraLinear
            ):
                continue
            if (
                is_linear(module)
                and module is not head
                and not (isinstance(module, LoraLinear) and module.base is head)
            ):
                out[name] = module
        return out

    def _validate(self, files: AdapterFiles, max_rank: int | None, device=None) -> _Prepared:
        where = f"adapter {files.name!r} ({files.path})"
        cfg = files.config
        with self._tree_lock:
            linear = self._linear_modules()
            modules = dict(self.model.named_modules())
        prepared: _Prepared = []
        for module_name, pair in sorted(files.modules.items()):
            module = modules.get(module_name)
            if module is None:
                raise AdapterError(
                    f"{where}: weights for module {module_name!r}, which does not exist in the base model "
                    f"({type(self.model).__name__}); was the adapter trained for another base model?"
                )
            if module_name not in linear:
                raise AdapterError(
                    f"{where}: module {module_name!r} is a {type(module).__name__}; only LoRA on linear "
                    "layers (nn.Linear, Conv1D) is supported yet"
                )
            if not cfg.targets(module_name, set(linear)):
                raise AdapterError(
                    f"{where}: the file has weights for {module_name!r} but adapter_config.json's "
                    "target_modules/exclude_modules/layers_to_transform do not select it; the config and "
                    "weights disagree"
                )
            prepared.append(
                (module_name, *self._prepare(where, module_name, module, pair, cfg, max_rank, device))
            )
        targeted = [m for m in linear if cfg.targets(m, set(linear))]
        missing = sorted(set(targeted) - set(files.modules))
        if missing:
            log.warning(
                "%s: config targets %d modules with no weights in the file, e.g. %s",
                where,
                len(missing),
                missing[0],
            )
        return prepared

    def _prepare(
        self, where, module_name, module, pair, cfg, max_rank, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        in_f, out_f = base_features(module.base if isinstance(module, LoraLinear) else module)
        a, b = pair.A, pair.B
        key = f"{where}, module {module_name!r}"
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[1] != in_f
            or b.shape[0] != out_f
            or a.shape[0] != b.shape[1]
        ):
            raise AdapterError(
                f"{key}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base layer "
                f"({in_f} -> {out_f}); the adapter was trained for a different base model"
            )
        r = a.shape[0]
        if r != cfg.rank_for(module_name):
            raise AdapterError(
                f"{key}: weights have rank {r} but the config says r={cfg.rank_for(module_name)}"
            )
        if max_rank is not None and r > max_rank:
            raise AdapterError(f"{key}: rank {r} is above the configured maximum {max_rank}")
        for label, t in (("lora_A", a), ("lora_B", b)):
            if not torch.isfinite(t).all():
                raise AdapterError(f"{key}: {label} holds NaN or Inf values; the adapter is corrupt")
        weight = module.weight
        device = weight.device if device is None else device
        scale = cfg.scale_for(module_name)
        a_t = a.to(torch.float32).t().contiguous().to(device=device, dtype=weight.dtype)
        b_t = (b.to(torch.float32) * scale).t().contiguous().to(device=device, dtype=weight.dtype)
        return a_t, b_t
