"""Adapter slots on one model: validate, wrap targeted modules, install and remove adapter weights."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blora.lora import backends
from blora.lora.backends import LoraBackend
from blora.lora.bounds import SizeBound
from blora.lora.config import AdapterError
from blora.lora.embedding import LoraEmbedding
from blora.lora.layers import LoraLinear, base_dtype_device, is_linear
from blora.lora.prepared import LoraWeights, PreparedAdapter, check_finite, prepare_module, prepare_saved
from blora.lora.saved import SavedModules
from blora.lora.weights import AdapterFiles, read_adapter
from blora.models.families import bump_structure_version
from blora.models.families.packing import Packed

log = logging.getLogger(__name__)

_WRAPPERS = (LoraLinear, LoraEmbedding, SavedModules)


@dataclass
class AdapterInfo:
    """A loaded adapter: its slot, where it came from, and what it touches (``saved``: its
    ``modules_to_save``)."""

    name: str
    slot: int
    source: str
    modules: tuple[str, ...]
    ranks: dict[str, int]
    num_params: int
    saved: tuple[str, ...] = ()

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)


def unwrap(module: nn.Module) -> nn.Module:
    """The model's own module under our wrappers."""
    while isinstance(module, _WRAPPERS):
        module = module.original if isinstance(module, SavedModules) else module.base
    return module


class LoraManager:
    """Holds any number of adapters beside one base model, each in its own slot.

    ``load`` validates everything before touching the model, so a failed load leaves the model and the
    adapters already loaded untouched.
    """

    def __init__(self, model: nn.Module, *, max_rank: int | None = None) -> None:
        self.model = model
        self.max_rank = max_rank
        self.adapters: dict[str, AdapterInfo] = {}
        self._wrappers: dict[str, LoraLinear | LoraEmbedding] = {}
        self._saved: dict[str, SavedModules] = {}
        self._installed: dict[str, PreparedAdapter] = {}  # on the model's device, shared with the wrappers
        self._tree_lock = threading.Lock()  # module-tree changes (wrapping) vs. ``prepare`` in other threads
        self.backend: LoraBackend | None = None  # library mode's LoRA backend (None: "auto" for the device)
        # library mode: wrapped linears run their base GEMM on a prepacked weight copy (``LoraLinear.pack``);
        # off for the engine, whose fast path packs its own copies
        self.packed_weights = False

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

    def set_backend(self, name: str) -> None:
        """Library mode's LoRA backend by name (``blora.lora.backends``), for the model's device."""
        device = next(self.model.parameters()).device
        self.backend = backends.select(name, backends.BackendOptions(device))

    def set_packed_weights(self, on: bool) -> None:
        """Library mode's prepacked base weights (``LoraLinear.pack``) on or off, for the wrappers there are
        and those later loads add. Skipped (with an info log) where a second copy of the weights would take
        more than half of the available memory (``Packed.worth_it``)."""
        self.packed_weights = on
        if on:
            self._pack([w for w in self._wrappers.values() if isinstance(w, LoraLinear)])
        else:
            for wrapper in self._wrappers.values():
                if isinstance(wrapper, LoraLinear):
                    wrapper.unpack()

    def _pack(self, wrappers: list[LoraLinear]) -> None:
        todo = [w for w in wrappers if w.pairs and w.packed is None and w.packable()]
        if not todo or not Packed.worth_it(sum(w.packed_nbytes for w in todo)):
            return
        for wrapper in todo:
            if not wrapper.pack():  # this torch build lacks the op (logged): no use trying the others
                return

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
        root: str | Path | None = None,
        max_bytes: int | None = None,
    ) -> PreparedAdapter:
        """Read and validate an adapter without changing the model (safe from another thread).

        ``device``: where the prepared tensors live (default: the model's device); ``install`` moves them.
        ``root``: the adapter's files must lie inside it. ``max_bytes``: refuse, from the weights file's
        header, an adapter whose prepared weights would need more. The file's size is bounded by the config
        and the model's shapes (``blora.lora.bounds``) before its tensors are read.
        """
        limit = self.max_rank if max_rank is None else max_rank
        table, head = self._module_table()
        element_size = next(self.model.parameters()).element_size()
        bound = SizeBound(table, _all_linear(table, head), head, limit, max_bytes, element_size)
        files = read_adapter(name, source, root=root, check_size=bound.check)
        modules, saved = self._validate(files, limit, device, bound)
        return PreparedAdapter(name=name, source=str(source), modules=modules, saved=saved)

    def install(self, prepared: PreparedAdapter) -> int:
        """Put a prepared adapter into a free slot; returns the slot."""
        name = prepared.name
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} is already loaded; unload it first or pick another name")
        slot = self._free_slot()
        modules = {}
        for module_name, weights in prepared.modules.items():
            wrapper = self._wrap_lora(module_name)
            w = modules[module_name] = weights.to(base_dtype_device(wrapper)[1])
            if isinstance(wrapper, LoraEmbedding):
                wrapper.set_lora(slot, w.a, w.b, dora_scale=w.dora_scale)
            else:
                wrapper.set_lora(slot, w.a, w.b, bias=w.bias, dora_scale=w.dora_scale)
        saved = {}
        for module_name, params in prepared.saved.items():
            saved_wrapper = self._wrap_saved(module_name)
            device = base_dtype_device(saved_wrapper.original)[1]
            saved[module_name] = {k: v.to(device, non_blocking=True) for k, v in params.items()}
            saved_wrapper.set_saved(slot, saved[module_name])
        if self.packed_weights:
            self._pack([lw for m in prepared.modules if isinstance(lw := self._wrappers[m], LoraLinear)])
        self._installed[name] = PreparedAdapter(name, prepared.source, modules, saved)
        self.adapters[name] = AdapterInfo(
            name=name,
            slot=slot,
            source=prepared.source,
            modules=tuple(prepared.modules),
            ranks={m: w.rank for m, w in prepared.modules.items()},
            num_params=sum(t.numel() for w in modules.values() for t in (w.a, w.b)),
            saved=tuple(prepared.saved),
        )
        return slot

    def export(self, name: str) -> PreparedAdapter:
        """The installed weights of ``name`` as a ``PreparedAdapter`` (shares the tensors)."""
        return self._installed[name]

    def unload(self, name: str) -> None:
        info = self.adapters.pop(name, None)
        if info is None:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {self.names()}")
        for module_name in info.modules:
            self._wrappers[module_name].reset_lora(info.slot)
        for module_name in info.saved:
            self._saved[module_name].reset_saved(info.slot)
        self._installed.pop(name, None)

    def _free_slot(self) -> int:
        used = {info.slot for info in self.adapters.values()}
        slot = 0
        while slot in used:
            slot += 1
        return slot

    def _wrap_lora(self, module_name: str) -> LoraLinear | LoraEmbedding:
        wrapper = self._wrappers.get(module_name)
        if wrapper is None:
            parent_name, _, child = module_name.rpartition(".")
            holder = self.model.get_submodule(parent_name) if parent_name else self.model
            if isinstance(getattr(holder, child), SavedModules):  # LoRA goes under another's saved copies
                holder, child = getattr(holder, child), "inner"
            inner = getattr(holder, child)
            wrapper = LoraEmbedding(inner) if isinstance(inner, nn.Embedding) else LoraLinear(inner)
            with self._tree_lock:
                setattr(holder, child, wrapper)
                bump_structure_version(self.model)
            self._wrappers[module_name] = wrapper
        return wrapper

    def _wrap_saved(self, module_name: str) -> SavedModules:
        wrapper = self._saved.get(module_name)
        if wrapper is None:
            parent_name, _, child = module_name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            current = getattr(parent, child)
            wrapper = SavedModules(current, unwrap(current))
            with self._tree_lock:
                setattr(parent, child, wrapper)
                bump_structure_version(self.model)
            self._saved[module_name] = wrapper
        return wrapper

    def _module_table(self) -> tuple[dict[str, nn.Module], str | None]:
        """Module name -> the model's own module (under our wrappers), and the output head's name."""
        table: dict[str, nn.Module] = {}

        def walk(module: nn.Module, prefix: str) -> None:
            for child_name, child in module._modules.items():
                if child is None:
                    continue
                name = prefix + child_name
                table[name] = unwrap(child)
                if not isinstance(child, _WRAPPERS):
                    walk(child, name + ".")

        with self._tree_lock:
            walk(self.model, "")
            getter = getattr(self.model, "get_output_embeddings", None)
            head = unwrap(getter()) if getter is not None and getter() is not None else None
        head_name = next((n for n, m in table.items() if m is head), None) if head is not None else None
        return table, head_name

    def _validate(
        self, files: AdapterFiles, max_rank: int | None, device: torch.device | str | None, bound: SizeBound
    ) -> tuple[dict[str, LoraWeights], dict[str, dict[str, torch.Tensor]]]:
        where = f"adapter {files.name!r} ({files.path})"
        cfg = files.config
        check_finite(where, _raw_tensors(files))
        table, all_linear = bound.table, bound.all_linear
        modules: dict[str, LoraWeights] = {}
        for module_name, raw in sorted(files.modules.items()):
            module = self._existing(where, table, module_name)
            if not raw.embedding and not is_linear(module) and not isinstance(module, nn.Embedding):
                raise AdapterError(
                    f"{where}: module {module_name!r} is a {type(module).__name__}; only LoRA on linear "
                    "layers (nn.Linear, Conv1D) and embeddings is supported yet"
                )
            if not cfg.targets(module_name, all_linear):
                raise AdapterError(
                    f"{where}: the file has weights for {module_name!r} but adapter_config.json's "
                    "target_modules/exclude_modules/layers_to_transform do not select it; the config and "
                    "weights disagree"
                )
            key = f"{where}, module {module_name!r}"
            modules[module_name] = prepare_module(key, module_name, module, raw, cfg, max_rank, device)
        check_finite(where, _prepared_tensors(modules), scaling=cfg.describe_scale)
        saved = {}
        for module_name, params in sorted(files.saved.items()):
            module = self._existing(where, table, module_name)
            if module_name in modules:
                raise AdapterError(
                    f"{where}: module {module_name!r} is both LoRA-targeted and in modules_to_save"
                )
            saved[module_name] = prepare_saved(f"{where}, module {module_name!r}", module, params, device)
        targeted = [m for m, mod in table.items() if is_linear(mod) and cfg.targets(m, all_linear)]
        missing = sorted(set(targeted) - set(files.modules))
        if missing:
            log.warning(
                "%s: config targets %d modules with no weights in the file, e.g. %s",
                where,
                len(missing),
                missing[0],
            )
        return modules, saved

    def _existing(self, where: str, table: dict[str, nn.Module], module_name: str) -> nn.Module:
        module = table.get(module_name)
        if module is None:
            raise AdapterError(
                f"{where}: weights for module {module_name!r}, which does not exist in the base model "
                f"({type(self.model).__name__}); was the adapter trained for another base model?"
            )
        return module


def _all_linear(table: dict[str, nn.Module], head: str | None) -> set[str]:
    """What PEFT's ``"all-linear"`` targets: every linear layer but the output head."""
    return {n for n, m in table.items() if is_linear(m) and n != head}


def _raw_tensors(files: AdapterFiles) -> list[tuple[str, str, torch.Tensor]]:
    """(module, label, tensor) for every tensor of the file, as saved."""
    named = [
        (m, label, t)
        for m, raw in files.modules.items()
        for label, t in (
            ("lora_A", raw.A),
            ("lora_B", raw.B),
            ("lora_B bias", raw.bias),
            ("magnitude", raw.magnitude),
            ("base layer copy", raw.base_weight),
        )
        if t is not None
    ]
    return named + [
        (m, f"modules_to_save {p}", t) for m, params in files.saved.items() for p, t in params.items()
    ]


def _prepared_tensors(modules: dict[str, LoraWeights]) -> list[tuple[str, str, torch.Tensor]]:
    """(module, label, tensor) for the prepared weights: scaled, in the model's dtype."""
    return [
        (m, label, t)
        for m, w in modules.items()
        for label, t in (
            ("lora_A", w.a),
            ("lora_B", w.b),
            ("lora_B bias", w.bias),
            ("DoRA scale", w.dora_scale),
        )
        if t is not None
    ]
