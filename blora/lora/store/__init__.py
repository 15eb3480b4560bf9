"""Adapter store: thousands of registered adapters in three tiers (disk -> host cache -> active slots).

``AdapterStore`` is a thin façade over one module per job:

- ``registry``: name -> source, plus directory *roots* whose sub-folders are adapters, resolved by name on
  first use and confined to the root (``blora.lora.paths.adapter_dir_inside``, shared with the server).
- ``cache``: prepared weights on the host, LRU under a byte budget.
- ``loader``: reads the adapters of waiting requests into the cache (a background thread, or inline at a
  defined point of the step); the only place a request's adapter is read.
- ``slots``: at most ``max_loras`` adapters installed in the model, LRU, never evicting one that a running
  request uses; pinned adapters stay in extra slots of their own.
- ``refs``: requests hold references (``acquire``/``release``); unloading or replacing an adapter in use is
  refused (``AdapterInUseError``) or, with ``wait=True``, happens when its last request finishes. During a
  waiting replace, requests that already hold the adapter finish on the old weights and newer ones wait
  for the new weights; during a waiting unload new requests for it are refused.
- ``stats``: ``residency()`` (cheap) and ``stats()`` (every counter), both dataclasses.

Admission is a pure check: ``ready`` says whether an adapter is in memory (cache or slot) and promises to
keep it there until ``activate`` installs it; it never reads the disk. The engine calls ``prefetch`` at the
start of each step: it sets the loader's window (the adapters of waiting requests, most urgent first), and
without a background thread the loader reads the window right there.

Mixtures (``blora.lora.mixtures``): a request's ``{"a": 0.5, "b": 0.5}`` is an adapter named
``mixture:{...}`` built by the loader from its components' weights; it holds its components like their own
requests do, and is dropped when a component is replaced or unloaded.

Threads: every method runs on the engine thread except ``prepare``, ``list``, ``registered``,
``residency`` and ``stats`` (any thread) and the loader's reads. One lock (a condition) guards what the
loader thread shares with the engine thread: the cache, the loader's state and the slot table; the
registry and the references are the engine thread's alone (other threads read copies).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from blora.lora.errors import AdapterError
from blora.lora.manager import LoraManager
from blora.lora.paths import contained_path
from blora.lora.prepared import PreparedAdapter
from blora.lora.store.cache import HostCache
from blora.lora.store.loader import Loader
from blora.lora.store.refs import AdapterInUseError
from blora.lora.store.registry import AdapterEntry, Registry, next_version
from blora.lora.store.slots import Slots
from blora.lora.store.stats import LoadCounters, Residency, StoreStats, percentiles


@dataclass
class StoreConfig:
    """``max_loras``: LRU slots (pinned adapters get extra ones); ``cpu_cache_bytes``: host cache budget;
    ``max_cpu_loras``: adapters in the host cache besides the byte budget (None: no count);
    ``prefetch_depth``: distinct adapters of waiting requests loaded ahead (default ``max_loras``);
    ``roots``: directories whose sub-folders are adapters; ``background``: load in a thread (else inline,
    in ``prefetch``)."""

    max_loras: int = 16
    cpu_cache_bytes: int = 2 << 30
    max_cpu_loras: int | None = None
    prefetch_depth: int | None = None
    max_rank: int | None = None
    roots: tuple[str | Path, ...] = ()
    background: bool = True


class AdapterStore:
    """Registry + host cache + loader + slots + references over one ``LoraManager`` (module docstring)."""

    def __init__(self, manager: LoraManager, config: StoreConfig | None = None) -> None:
        self.manager = manager
        self.config = config = config or StoreConfig()
        self._lock = threading.Condition()
        self.registry = Registry(config.roots)
        self.slots = Slots(manager, self._lock, config.max_loras)
        self.cache = HostCache(self._lock, config.cpu_cache_bytes, config.max_cpu_loras)
        self.loader = Loader(
            self._lock, self.registry, self.cache, self.slots, self._prepare, background=config.background
        )
        self._counters = LoadCounters()
        self._waiting_owners: set[str] = set()
        self._element_size = next(manager.model.parameters()).element_size()
        for name, info in manager.adapters.items():  # adapters loaded before the store existed: pinned
            self.registry.add(AdapterEntry(name, info.source, from_root=False, pinned=True))
            self.slots.adopt(name)

    @property
    def roots(self) -> list[Path]:
        return self.registry.roots

    # -- registry ----------------------------------------------------------------------------------
    def register(self, name: str, source: str | Path) -> None:
        """Make ``name`` available; nothing is read until a request uses it."""
        self.registry.register(name, source)

    def __contains__(self, name: str) -> bool:
        try:
            self.registry.entry(name)
        except AdapterError:
            return False
        return True

    def list(self) -> dict[str, str]:
        """Registered adapters and the adapters found under the roots (scanned now): name -> source."""
        return self.registry.list()

    def lookup(self, name: str) -> str | None:
        """``list().get(name)`` without scanning the roots (safe from any thread; records nothing)."""
        return self.registry.lookup(name)

    def registered(self) -> dict[str, str]:
        """Adapters registered or loaded by name and not being unloaded (no root scan): name -> source."""
        return self.registry.registered()

    def source(self, name: str) -> str:
        """Where ``name``'s files are (``AdapterError`` naming the known adapters if it is unknown)."""
        return self.registry.entry(name).source

    def identity(self, name: str) -> str:
        """What ``name`` computes now, for caches keyed by adapter (the prefix cache): its name and a version
        that changes when it is replaced or unloaded and registered again; a mixture's names its components'."""
        entry = self.registry.entry(name)
        if entry.mixture is not None:
            return name + "@" + ",".join(str(self.registry.entry(c).version) for c in entry.mixture.names)
        return f"{name}@{entry.version}"

    # -- explicit load / unload / pin --------------------------------------------------------------
    def load(
        self,
        name: str,
        source: str | Path,
        *,
        replace: bool = False,
        wait: bool = False,
        pin: bool = False,
        prepared: PreparedAdapter | None = None,
    ) -> concurrent.futures.Future[None] | None:
        """Register ``name`` and read + validate it now (errors raise here, changing nothing).

        An existing name needs ``replace=True``; if requests use it, the replace is refused
        (``AdapterInUseError``) or, with ``wait=True``, deferred: returns a future done at the swap.
        ``prepared``: the adapter already read and validated by ``prepare`` in another thread (an engine
        thread must not spend its time reading and checking files: it passes the result here).
        """
        old = self.registry.get(name)
        if old is not None and not replace and not old.from_root:
            raise AdapterError(
                f"adapter {name!r} is already registered (from {old.source}); pass replace=True"
            )
        if old is not None and old.refs.pending is not None:
            raise AdapterInUseError(
                f"adapter {name!r} already has a pending {old.refs.pending.action}; wait for it"
            )
        if prepared is None or prepared.name != name or prepared.source != str(source):
            prepared = self._prepare(name, str(source))
        if old is None:
            self.registry.register(name, source)
            self.cache.put(name, prepared)
            if pin:
                self.pin(name)
            return None
        if old.refs.holders() and not wait:
            raise old.refs.in_use(name, "replace")
        old.source, old.from_root = str(source), False
        future = old.refs.start(name, "replace", prepared).future
        self._finish_if_due(old)
        if pin:
            old.pinned = True
        return None if future.done() else future

    def unload(self, name: str, *, wait: bool = False) -> concurrent.futures.Future[None] | None:
        """Forget ``name`` and free its memory (an adapter under a root stays resolvable from disk).

        In use: ``AdapterInUseError``, or with ``wait=True`` a future done when its last request finished
        (new requests for it are refused meanwhile)."""
        entry = self.registry.get(name)
        if entry is None:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {sorted(self.list())}")
        if entry.refs.pending is not None:
            raise AdapterInUseError(f"adapter {name!r} already has a pending {entry.refs.pending.action}")
        if entry.refs.users and not wait:
            raise entry.refs.in_use(name, "unload")
        future = entry.refs.start(name, "unload").future
        self._finish_if_due(entry)
        return None if future.done() else future

    def pin(self, name: str) -> None:
        """Keep ``name`` in a slot of its own (read now if needed); pinned adapters never leave."""
        entry = self.registry.entry(name)
        if not self.loader.in_memory(name):
            self.cache.put(name, self._prepare(name, entry.source, entry.root))
        entry.pinned = True
        self.activate([name], busy=set())

    def unpin(self, name: str) -> None:
        self.registry.entry(name).pinned = False

    def _finish_if_due(self, entry: AdapterEntry) -> None:
        """Run ``entry``'s pending unload/replace once no request holds its current weights."""
        pending = entry.refs.due()
        if pending is None:
            return
        self._evict_everywhere(entry.name)
        for mixture in self.registry.mixtures_of(entry.name):  # built from the old weights
            self._evict_everywhere(mixture.name)
        entry.refs.finish()
        if pending.action == "unload":
            if not entry.refs.users:
                self.registry.remove(entry.name)
        else:
            assert pending.prepared is not None  # a replace always carries its weights
            entry.version = next_version()
            entry.error = None
            entry.nbytes = pending.prepared.nbytes
            self.cache.put(entry.name, pending.prepared)
            if entry.pinned:
                self.activate([entry.name], busy=set())
        pending.future.set_result(None)

    def _evict_everywhere(self, name: str) -> None:
        if name in self.slots:
            self.slots.remove(name)
        self.cache.pop(name)
        self.loader.discard(name)  # a read in flight for the old generation is dropped

    # -- request references ------------------------------------------------------------------------
    def acquire(self, name: str, owner: str) -> None:
        """A request starts using ``name`` (raises ``AdapterError`` for unknown or departing adapters)."""
        entry = self.registry.entry(name)
        if entry.mixture is not None:
            entry.refs.check_open(name)
            done: list[str] = []
            try:
                for component in entry.mixture.names:
                    self.acquire(component, owner)
                    done.append(component)
            except AdapterError:
                for component in done:
                    self.release(component, owner)
                raise
        entry.refs.acquire(name, owner)
        tier = "slot" if name in self.slots else "cache" if name in self.cache else "disk"
        with self._lock:
            self._counters.arrivals[tier] += 1

    def release(self, name: str, owner: str) -> None:
        self._waiting_owners.discard(owner)
        entry = self.registry.get(name)
        if entry is None or not entry.refs.release(owner):
            return
        if entry.mixture is not None:
            for component in entry.mixture.names:
                self.release(component, owner)
        self._finish_if_due(entry)

    # -- engine step hooks -------------------------------------------------------------------------
    def prefetch(self, names: Iterable[str]) -> None:
        """Adapters of waiting requests, most urgent first: the loader reads the head of the list (up to
        ``prefetch_depth`` distinct adapters and what the cache budget holds), in its thread or, without
        one, now. The engine calls this at the start of each step, before scheduling."""
        depth = self.config.prefetch_depth or self.config.max_loras
        window = self.loader.window(names, depth, self.config.cpu_cache_bytes, self._element_size)
        self.cache.reserve_window(window)
        self.cache.clear_promises()  # promises live from one schedule to its activate
        self.loader.want(window)

    def ready(self, name: str, owner: str | None = None) -> bool:
        """Whether a request of ``owner`` for ``name`` can be admitted now: its adapter is in memory and
        it runs on the current weights. A pure check (it never reads the disk); a yes keeps the adapter in
        the cache until ``activate``."""
        entry = self.registry.get(name)
        if entry is None or entry.error is not None:
            return False
        if owner is not None and not self._current(entry, owner):
            return False  # arrived during a pending replace: waits for the new weights
        with self._lock:
            if self.loader.in_memory(name):
                self.cache.promise(name)
                return True
        if owner is not None and owner not in self._waiting_owners:
            self._waiting_owners.add(owner)
            self._counters.waited += 1
        return False

    def _current(self, entry: AdapterEntry, owner: str) -> bool:
        if not entry.refs.is_current(owner):
            return False
        for component in entry.mixture.names if entry.mixture is not None else ():
            c = self.registry.get(component)
            if c is None or not c.refs.is_current(owner):
                return False
        return True

    def activate(self, names: Iterable[str], busy: set[str]) -> None:
        """Install ``names`` in slots (from the host cache), evicting LRU slots that ``busy`` adapters and
        pinned ones do not hold. Called by the engine after scheduling, before running the step."""
        names = list(names)
        for name in names:
            if self.slots.touch(name):
                continue
            prepared = self.cache.get(name, touch=True)
            if prepared is None:
                raise RuntimeError(f"adapter {name!r} was scheduled but is not in the host cache")
            for victim, weights in self.slots.install(name, prepared, busy | set(names), self._pinned):
                # on CPU the slot's tensors are the prepared ones: keep them in the cache if they fit
                if self.slots.on_cpu and victim not in self.cache and self.registry.get(victim) is not None:
                    self.cache.put(victim, weights, required=False)
        self.cache.clear_promises()

    def _pinned(self, name: str) -> bool:
        entry = self.registry.get(name)
        return entry is not None and entry.pinned

    def slot(self, name: str) -> int:
        return self.slots.slot(name)

    def loading(self) -> bool:
        """Whether the loader has work (the engine may wait for it instead of spinning)."""
        return self.loader.busy()

    def wait_for_load(self, timeout: float) -> None:
        self.loader.wait(timeout)

    def take_failures(self) -> dict[str, Exception]:
        """Adapters whose load failed since the last call; their error is cleared, so a later request
        retries the load."""
        return self.loader.take_failures()

    # -- reading -----------------------------------------------------------------------------------
    def prepare(self, name: str, source: str | Path) -> PreparedAdapter:
        """Read and validate ``source`` for ``load(name, source, prepared=...)``; touches no engine state,
        so it runs in any thread (the caller's, a worker's), never needing the engine thread."""
        return self._prepare(name, str(source))

    def _prepare(self, name: str, source: str, root: Path | None = None) -> PreparedAdapter:
        t0 = time.perf_counter()
        budget = self.config.cpu_cache_bytes
        prepared = self.manager.prepare(
            name, source, max_rank=self.config.max_rank, device="cpu", root=root, max_bytes=budget
        )
        if prepared.nbytes > budget:
            raise AdapterError(
                f"adapter {name!r} needs {prepared.nbytes / 2**20:.1f} MiB, more than the whole CPU cache "
                f"budget ({budget / 2**20:.1f} MiB); raise cpu_cache_bytes"
            )
        with self._lock:
            self._counters.loads += 1
            self._counters.seconds.append(time.perf_counter() - t0)
        return prepared

    def close(self) -> None:
        self.loader.close()

    # -- introspection -----------------------------------------------------------------------------
    def residency(self) -> Residency:
        """Where adapters' weights are now (cheap: the engine reads it after every step)."""
        with self._lock:
            active, cached = tuple(self.slots.names()), tuple(self.cache.names())
        return Residency(active, cached, tuple(n for n in active if self._pinned(n)))

    def stats(self) -> StoreStats:
        """Tiers, hit counts, load/install latencies (ms: p50/p99/max) and memory in bytes."""
        with self._lock:
            c, slots = self._counters, self.slots
            cached = self.cache.names()
            active = slots.names()
            slot_bytes = slots.nbytes()
            cache_only = sum(
                p.nbytes for n in cached if n not in slots and (p := self.cache.get(n)) is not None
            )
            entries = self.registry.entries()
            return StoreStats(
                registered=sum(not e.from_root for e in entries),
                roots=[str(r) for r in self.roots],
                cached=cached,
                active=active,
                pinned=[e.name for e in entries if e.pinned],
                arrivals=dict(c.arrivals),
                requests_waited_for_load=c.waited,
                activations={k: v for k, v in (("slot_hit", slots.hits), ("install", slots.installs)) if v},
                loads=c.loads,
                load_failures=self.loader.load_failures,
                cache_evictions=self.cache.evictions,
                slot_evictions=slots.evictions,
                load_ms=percentiles(c.seconds),
                install_ms=percentiles(slots.install_seconds),
                install_total_ms=round(1000 * sum(slots.install_seconds), 3),
                cache_bytes=self.cache.nbytes,
                cache_peak_bytes=self.cache.peak_bytes,
                cache_budget_bytes=self.cache.budget_bytes,
                slot_bytes=slot_bytes,
                resident_bytes=slot_bytes + cache_only,
            )


__all__ = ["AdapterInUseError", "AdapterStore", "Residency", "StoreConfig", "StoreStats", "contained_path"]
