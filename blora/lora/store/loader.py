"""Loader: reads the adapters of waiting requests into the host cache before their turn.

The only place where an adapter is read on behalf of a request (admission never reads the disk). With
``background`` the reads run in the thread ``blora-adapter-loader``; without, ``want`` reads the window in
its caller's thread, at the point the engine calls it (the start of a step, before scheduling).

Invariants, under the store's lock (shared with the host cache):

- ``wanted`` is the prefetch window, most urgent first; the cache keeps it reserved.
- ``loading`` maps each adapter being read to the generation it was read for: a read whose adapter was
  replaced or unloaded meanwhile (its generation changed, or it left ``loading``) is discarded.
- A failed read sets the record's ``error`` (so it is not retried) and is reported once through
  ``take_failures``, which clears the error, so a later request retries.
- A mixture is built only once its components are in memory (cache or slot), from their weights.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from blora import kernels
from blora.lora.mixtures import combine
from blora.lora.paths import ADAPTER_FILES
from blora.lora.prepared import PreparedAdapter
from blora.lora.store.cache import HostCache
from blora.lora.store.registry import AdapterEntry, Registry
from blora.lora.store.slots import Slots

log = logging.getLogger("blora.lora.store")

Prepare = Callable[[str, str, Path | None], PreparedAdapter]  # (name, source, root) -> validated weights


class Loader:
    """The prefetch window and the reads that fill the cache (see the module docstring)."""

    def __init__(
        self,
        lock: threading.Condition,
        registry: Registry,
        cache: HostCache,
        slots: Slots,
        prepare: Prepare,
        *,
        background: bool = True,
    ) -> None:
        self.background = background
        self.load_failures = 0
        self._lock = lock
        self._registry = registry
        self._cache = cache
        self._slots = slots
        self._prepare = prepare
        self._wanted: list[str] = []
        self._loading: dict[str, int] = {}
        self._failures: dict[str, Exception] = {}
        self._closed = False
        self._thread: threading.Thread | None = None

    def in_memory(self, name: str) -> bool:
        return name in self._cache or name in self._slots

    # -- the window ----------------------------------------------------------------------------------
    def window(self, names: Iterable[str], depth: int, budget: int, element_size: int) -> list[str]:
        """The head of ``names`` (mixtures after their components): up to ``depth`` distinct adapters whose
        (estimated) sizes fit ``budget``; unknown or failed adapters are left out."""
        window: list[str] = []
        for name in dict.fromkeys(self._expand(names)):
            entry = self._registry.get(name)
            if entry is None or entry.error is not None:
                continue
            size = entry.nbytes or self._estimate(entry, element_size)
            if window and size > budget:
                break
            budget -= size
            window.append(name)
            if len(window) >= depth:
                break
        return window

    def want(self, window: list[str]) -> None:
        """Make ``window`` the adapters to load, and load them: wakes the thread, or reads them now."""
        with self._lock:
            self._wanted = window
            self._lock.notify_all()
            if not any(not self.in_memory(n) and n not in self._loading for n in window):
                return
            if self.background:
                self._start_thread()
                return
        for name in window:  # inline: in order, so a mixture's components come first
            if self._loadable(name):
                self.load_now(name)

    @property
    def wanted(self) -> list[str]:
        return self._wanted

    def busy(self) -> bool:
        """Whether the loader has work (the engine may wait for it instead of spinning)."""
        with self._lock:
            return bool(self._loading) or any(not self.in_memory(n) for n in self._wanted)

    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` s for a load to finish (or the window to change)."""
        with self._lock:
            if self._loading or self._wanted:
                self._lock.wait(timeout)

    def discard(self, name: str) -> None:
        """A read in flight for ``name`` is dropped when it finishes (its weights changed)."""
        with self._lock:
            self._loading.pop(name, None)

    def take_failures(self) -> dict[str, Exception]:
        """Adapters whose load failed since the last call; their error is cleared (a later request
        retries)."""
        with self._lock:
            failures, self._failures = self._failures, {}
        for name in failures:
            entry = self._registry.get(name)
            if entry is not None:
                entry.error = None
        return failures

    # -- reading -------------------------------------------------------------------------------------
    def load_now(self, name: str) -> None:
        """Read ``name`` into the cache in this thread (the loader thread, or the engine's when inline)."""
        with self._lock:
            entry = self._registry.get(name)
            if entry is None or self.in_memory(name):
                return
            generation = entry.refs.generation
            self._loading[name] = generation
        try:
            mixed = entry.mixture is not None
            prepared = self._mix(entry) if mixed else self._prepare(name, entry.source, entry.root)
        except Exception as exc:
            with self._lock:
                self.load_failures += 1
                if self._loading.pop(name, None) == generation and entry.refs.generation == generation:
                    entry.error = exc
                    self._failures[name] = exc
                self._lock.notify_all()
            log.warning("loading adapter %r failed: %s", name, exc)
            return
        with self._lock:
            deadline = time.monotonic() + 1.0  # inline, nobody could free space meanwhile: no wait
            while self.background and self._must_wait(prepared) and time.monotonic() < deadline:
                self._lock.wait(0.05)  # space promised to this step's admissions frees at activate()
            if self._loading.pop(name, None) == generation and entry.refs.generation == generation:
                entry.nbytes = prepared.nbytes
                self._cache.put(name, prepared)
            self._lock.notify_all()

    def _must_wait(self, prepared: PreparedAdapter) -> bool:
        return self._cache.has_promises and not self._cache.fits(prepared)

    def _mix(self, entry: AdapterEntry) -> PreparedAdapter:
        assert entry.mixture is not None  # only called for mixtures
        with self._lock:
            parts = [(self._cache.get(n) or self._slots.get(n), w) for n, w in entry.mixture.weights]
        missing = [n for (p, _), n in zip(parts, entry.mixture.names, strict=True) if p is None]
        if missing:
            raise RuntimeError(f"mixture {entry.name}: components {missing} are not loaded")
        return combine(entry.name, [(p, w) for p, w in parts if p is not None])

    def _loadable(self, name: str) -> bool:
        entry = self._registry.get(name)
        return (
            entry is not None
            and entry.error is None
            and not self.in_memory(name)
            and name not in self._loading
            and (entry.mixture is None or all(self.in_memory(n) for n in entry.mixture.names))
        )

    def _expand(self, names: Iterable[str]) -> Iterable[str]:
        """Mixtures come after their components (which they are built from)."""
        for name in names:
            entry = self._registry.get(name)
            if entry is not None and entry.mixture is not None:
                yield from entry.mixture.names
            yield name

    def _estimate(self, entry: AdapterEntry, element_size: int) -> int:
        if entry.mixture is None:
            return estimate_bytes(entry.source, element_size)
        parts = [self._registry.get(n) for n in entry.mixture.names]
        return sum(p.nbytes or estimate_bytes(p.source, element_size) for p in parts if p is not None)

    # -- the thread ----------------------------------------------------------------------------------
    def _start_thread(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="blora-adapter-loader", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        kernels.one_openmp_thread()  # small copies; a second OpenMP team would slow the engine's ops
        while True:
            with self._lock:
                name = self._next_wanted()
                while name is None and not self._closed:
                    self._lock.wait()
                    name = self._next_wanted()
                if self._closed or name is None:
                    return
            self.load_now(name)

    def _next_wanted(self) -> str | None:
        return next((n for n in self._wanted if self._loadable(n)), None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)


def estimate_bytes(source: str, element_size: int) -> int:
    """Upper bound of an adapter's prepared size before its first load, from its weights file's size
    (stored in 16 bits or more per value, prepared in the model's dtype)."""
    for fname in ADAPTER_FILES[1:]:
        try:
            return (Path(source) / fname).stat().st_size * max(1, element_size // 2)
        except OSError:
            continue
    return 0
