"""Host cache: prepared (validated, transposed, scaled) adapter weights in host memory, LRU under a budget.

Invariants, all under the store's lock (the loader thread inserts, the engine thread reads and evicts):

- ``nbytes`` is the sum of the cached adapters' sizes; after an insert it is within ``budget_bytes`` and
  the count within ``max_count`` unless only reserved adapters are left to evict.
- Reserved adapters (the prefetch window and the ones admission promised to this step) are never evicted:
  the engine counts on finding them here when it installs them.
- An optional insert (a slot's weights kept for later) is dropped, evicting nothing, when it would not fit
  even after evicting every unreserved adapter.
"""

from __future__ import annotations

import collections
import threading

from blora.lora.prepared import PreparedAdapter


class HostCache:
    """LRU of ``PreparedAdapter`` by name (see the module docstring)."""

    def __init__(self, lock: threading.Condition, budget_bytes: int, max_count: int | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.max_count = max_count
        self.nbytes = 0
        self.peak_bytes = 0
        self.evictions = 0
        self._lock = lock
        self._items: collections.OrderedDict[str, PreparedAdapter] = collections.OrderedDict()
        self._window: frozenset[str] = frozenset()  # the loader's prefetch window
        self._promised: set[str] = set()  # admitted to this step: kept until installed in a slot

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def get(self, name: str, *, touch: bool = False) -> PreparedAdapter | None:
        """The cached weights of ``name``; ``touch`` marks them most recently used."""
        with self._lock:
            prepared = self._items.get(name)
            if prepared is not None and touch:
                self._items.move_to_end(name)
            return prepared

    def reserve_window(self, names: list[str]) -> None:
        """Protect the prefetch window from eviction (replaces the previous window)."""
        with self._lock:
            self._window = frozenset(names)

    def promise(self, name: str) -> None:
        """Keep ``name`` (admitted to this step) until ``clear_promises``."""
        with self._lock:
            self._promised.add(name)

    def clear_promises(self) -> None:
        """The step's adapters are installed (or the step was planned again): free their space."""
        with self._lock:
            self._promised.clear()
            self._lock.notify_all()  # a loaded adapter may wait for promised space

    @property
    def has_promises(self) -> bool:
        return bool(self._promised)

    def _reserved(self) -> frozenset[str] | set[str]:
        return self._window | self._promised

    def put(self, name: str, prepared: PreparedAdapter, *, required: bool = True) -> bool:
        """Insert as most recent, evicting LRU adapters that are not reserved. An insert that is not
        ``required`` is dropped instead when it does not fit; returns whether ``name`` is cached."""
        with self._lock:
            self.pop(name)
            reserved = self._reserved()
            victims = [n for n in self._items if n not in reserved and n != name]
            freeable = sum(self._items[n].nbytes for n in victims)
            too_many = self.max_count is not None and len(self._items) - len(victims) + 1 > self.max_count
            if not required and (self.nbytes - freeable + prepared.nbytes > self.budget_bytes or too_many):
                return False
            self._items[name] = prepared
            self.nbytes += prepared.nbytes
            for victim in victims:
                if self.nbytes <= self.budget_bytes and (
                    self.max_count is None or len(self._items) <= self.max_count
                ):
                    break
                self.pop(victim)
                self.evictions += 1
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
            return True

    def fits(self, prepared: PreparedAdapter) -> bool:
        """Whether ``prepared`` fits once every unreserved adapter is evicted."""
        with self._lock:
            reserved = self._reserved()
            freeable = sum(
                p.nbytes for n, p in self._items.items() if n not in reserved and n != prepared.name
            )
            return self.nbytes - freeable + prepared.nbytes <= self.budget_bytes

    def pop(self, name: str) -> PreparedAdapter | None:
        with self._lock:
            prepared = self._items.pop(name, None)
            if prepared is not None:
                self.nbytes -= prepared.nbytes
            return prepared
