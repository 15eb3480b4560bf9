"""Slots: the adapters installed in the model (``LoraManager``), at most ``max_loras`` of them LRU plus the
pinned ones in extra slots of their own.

Invariants (changed on the engine thread only, under the store's lock so that the loader thread can read
a component's weights for a mixture):

- Every name here is installed in the manager, with exactly these prepared weights.
- Besides pinned adapters, at most ``max_loras`` are installed; an install evicts the least recently used
  adapter that neither the step nor a running request needs (``keep``), never a pinned one, and fails
  (``RuntimeError``) rather than evict one that is needed.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from blora.lora.manager import LoraManager
from blora.lora.prepared import PreparedAdapter


class Slots:
    """Installed adapters by name, LRU (see the module docstring)."""

    def __init__(self, manager: LoraManager, lock: threading.Condition, max_loras: int) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        self.manager = manager
        self.max_loras = max_loras
        self.evictions = 0
        self.hits = 0
        self.installs = 0
        self.install_seconds: collections.deque[float] = collections.deque(maxlen=100_000)
        self._lock = lock
        self._items: collections.OrderedDict[str, PreparedAdapter] = collections.OrderedDict()

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def get(self, name: str) -> PreparedAdapter | None:
        return self._items.get(name)

    def nbytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._items.values())

    def adopt(self, name: str) -> None:
        """An adapter the manager had before the store existed (its weights exported, kept pinned)."""
        with self._lock:
            self._items[name] = self.manager.export(name)

    def touch(self, name: str) -> bool:
        """Mark ``name`` most recently used; False if it is not installed."""
        with self._lock:
            if name not in self._items:
                return False
            self._items.move_to_end(name)
        self.hits += 1
        return True

    def install(
        self, name: str, prepared: PreparedAdapter, keep: set[str], pinned: Callable[[str], bool]
    ) -> list[tuple[str, PreparedAdapter]]:
        """Install ``prepared`` as ``name``, first evicting LRU slots that are neither in ``keep`` nor
        ``pinned`` (a pinned ``name`` takes an extra slot). Returns the evicted adapters and weights."""
        evicted = [] if pinned(name) else self._free_slot_for(name, keep, pinned)
        t0 = time.perf_counter()
        self.manager.install(prepared)
        self.install_seconds.append(time.perf_counter() - t0)
        with self._lock:
            self._items[name] = prepared
        self.installs += 1
        return evicted

    def _free_slot_for(
        self, name: str, keep: set[str], pinned: Callable[[str], bool]
    ) -> list[tuple[str, PreparedAdapter]]:
        evicted = []
        held = {n for n in self._items if pinned(n)}
        while len(self._items) - len(held) >= self.max_loras:
            victim = next((n for n in self._items if n not in keep and n not in held), None)
            if victim is None:
                raise RuntimeError(
                    f"no free adapter slot for {name!r}: all {self.max_loras} slots are in use"
                )
            evicted.append((victim, self.remove(victim)))
            self.evictions += 1
        return evicted

    def remove(self, name: str) -> PreparedAdapter:
        """Uninstall ``name`` (it must be installed); returns its weights."""
        with self._lock:
            prepared = self._items.pop(name)
        self.manager.unload(name)
        return prepared

    def slot(self, name: str) -> int:
        return self.manager.slot(name)

    @property
    def on_cpu(self) -> bool:
        """Whether slots hold the prepared tensors themselves (no copy to a device)."""
        return next(self.manager.model.parameters()).device.type == "cpu"
