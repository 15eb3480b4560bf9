"""LoRA backends by name, and the choice of one per engine.

``"torch"``: PyTorch ops (segments / rank-grouped bmm / stacked GEMMs, picked per shape), any device.
``"cpu"``: the C++ kernel (``blora.kernels``) for adapters with few tokens, PyTorch GEMMs for the rest.
``"reference"``: the protocol's plain specification (tests). A new backend plugs in with ``register``
(a factory, or ``"module:attribute"`` imported on first use) and a place in ``PREFERENCE``; layers, runner
and engine only ever see the ``LoraBackend`` that ``select`` returns.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from blora import kernels
from blora.lora.backends.base import BackendUnavailableError, BoundAdd, LoraBackend, ReferenceBackend

logger = logging.getLogger("blora")


@dataclass(frozen=True)
class BackendOptions:
    """What a backend factory may read: the engine's device and its CPU-kernel settings.
    ``cpu_kernel``: the C++ kernel may be used; ``kernel_max_work``: tokens x rank per adapter up to which
    an adapter's tokens go through it (above: GEMMs)."""

    device: torch.device
    cpu_kernel: bool = True
    kernel_max_work: int = kernels.MAX_WORK


Factory = Callable[[BackendOptions], LoraBackend]

_FACTORIES: dict[str, Factory | str] = {
    "reference": "blora.lora.backends.base:ReferenceBackend.create",
    "torch": "blora.lora.backends.torch_ops:TorchBackend.create",
    "cpu": "blora.lora.backends.cpu:CpuKernelBackend.create",
    "triton": "blora.lora.backends.triton:TritonBackend.create",
}
# "auto": the first of these that can run on the device type (the rest: "torch")
PREFERENCE: dict[str, tuple[str, ...]] = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}


def register(name: str, factory: Factory | str) -> None:
    """Make backend ``name`` available: ``factory(options)`` returns it or raises
    ``BackendUnavailableError``; a ``"module:attribute"`` string is imported on first use."""
    _FACTORIES[name] = factory


def names() -> list[str]:
    return sorted(_FACTORIES)


def create(name: str, options: BackendOptions) -> LoraBackend:
    """Backend ``name`` for ``options`` (``ValueError`` for an unknown name, ``BackendUnavailableError``
    when it cannot run here)."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown LoRA backend {name!r}; registered: {', '.join(names())} (or 'auto')")
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        factory = obj  # the registered "module:attribute" factory
    return factory(options)


def select(name: str, options: BackendOptions) -> LoraBackend:
    """The backend ``name``, or for ``"auto"`` the first of ``PREFERENCE[device type]`` that can run here."""
    if name != "auto":
        return create(name, options)
    for candidate in (*PREFERENCE.get(options.device.type, ()), "torch"):
        if candidate not in _FACTORIES:
            continue
        try:
            return create(candidate, options)
        except BackendUnavailableError as exc:
            logger.debug("blora: LoRA backend %r not used (%s)", candidate, exc)
    raise BackendUnavailableError(f"no LoRA backend can run on {options.device}")


_DEFAULTS: dict[torch.device, LoraBackend] = {}


def default(device: torch.device) -> LoraBackend:
    """The ``"auto"`` backend with default options for ``device`` (library mode, ``lora_batch``), cached."""
    backend = _DEFAULTS.get(device)
    if backend is None:
        backend = _DEFAULTS[device] = select("auto", BackendOptions(device))
    return backend


__all__ = [
    "BackendOptions",
    "BackendUnavailableError",
    "BoundAdd",
    "LoraBackend",
    "ReferenceBackend",
    "create",
    "default",
    "names",
    "register",
    "select",
]
