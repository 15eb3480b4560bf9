"""Adapter store: thousands of registered adapters in three tiers (disk -> CPU cache -> active slots).

- **Registry**: name -> source (local directory or hub id), plus directory *roots* whose sub-folders are
  adapters, resolved by name on first use. Registering costs one small dict entry; nothing is read until a
  request uses the adapter. Names that come from outside resolve only inside a root: absolute paths, ``..``
  and symlinks that leave the root are refused.
- **CPU cache**: prepared (validated, transposed, scaled) weights on the host, LRU under a byte budget.
- **Slots**: at most ``max_loras`` adapters installed in the model, LRU, never evicting one that a running
  request uses; pinned adapters stay in extra slots of their own.
- **Prefetch**: a background thread reads the adapters of waiting requests into the CPU cache before their
  turn. The engine admits a request only once its adapter is in the cache or a slot, so a cold load never
  stalls the running batch; installing from the cache is a copy to the model's device (none on CPU).
- **Hot load / replace / unload**: requests hold references (``acquire``/``release``). Unloading or
  replacing an adapter that requests still use is refused with ``AdapterInUseError``, or with ``wait=True``
  happens when its last request finishes. During a waiting replace, requests that already hold the adapter
  finish on the old weights and newer ones wait for the new weights; during a waiting unload new requests
  for it are refused.
- **Mixtures** (``blora.lora.mixtures``): a request's ``{"a": 0.5, "b": 0.5}`` is an adapter named
  ``mixture:{...}`` built (in the loader thread) from its components' cached weights; it holds its
  components like their own requests do, and is dropped when a component is replaced or unloaded.

Threads: every method except the loader's and ``prepare`` runs on the engine thread; the loader thread
(and a caller's worker thread, through ``prepare``) only prepares weights (``LoraManager.prepare`` reads no
mutable engine state) and hands them over under ``_lock``. Reading, validating and regex matching of an
adapter's config therefore never run on the engine thread in the background paths; an explicit ``load``
runs them in its caller's thread unless the caller passes what ``prepare`` returned.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from blora import kernels
from blora.lora.config import AdapterError
from blora.lora.manager import LoraManager, PreparedAdapter
from blora.lora.mixtures import PREFIX, Mixture, combine, is_mixture
from blora.lora.paths import ADAPTER_FILES, check_files_inside, contained_path, os_reason
from blora.lora.weights import resolve_adapter_dir

log = logging.getLogger(__name__)

_WEIGHT_FILES = ADAPTER_FILES
_VERSIONS = itertools.count(1)  # weight versions, unique in the process (prefix-cache keys)


class AdapterInUseError(AdapterError):
    """Unload/replace of an adapter that unfinished requests still use (and ``wait`` was not asked for)."""


@dataclass
class StoreConfig:
    """``max_loras``: LRU slots (pinned adapters get extra ones); ``cpu_cache_bytes``: host cache budget;
    ``prefetch_depth``: distinct adapters of waiting requests loaded ahead (default ``max_loras``);
    ``roots``: directories whose sub-folders are adapters; ``background``: load in a thread (else inline)."""

    max_loras: int = 16
    cpu_cache_bytes: int = 2 << 30
    max_cpu_loras: int | None = None  # adapters in the host cache, besides the byte budget (None: no count)
    prefetch_depth: int | None = None
    max_rank: int | None = None
    roots: tuple[str | Path, ...] = ()
    background: bool = True


@dataclass(eq=False)
class _Pending:
    """An unload or replace waiting for the requests that hold the current generation."""

    action: str  # "unload" | "replace"
    future: concurrent.futures.Future
    prepared: PreparedAdapter | None = None


@dataclass(eq=False)
class _Entry:
    name: str
    source: str
    from_root: bool
    pinned: bool = False
    generation: int = 0
    users: dict[str, int] = field(default_factory=dict)  # owner (request id) -> generation it runs on
    pending: _Pending | None = None
    nbytes: int | None = None  # known after the first load
    error: Exception | None = None
    mixture: Mixture | None = None
    root: Path | None = None  # files must stay inside it (adapters found under a root)
    version: int = field(default_factory=lambda: next(_VERSIONS))  # new on every replace / re-register


@dataclass
class StoreStats:
    """Counters since the store was created (``AdapterStore.stats()`` returns them as a dict)."""

    arrivals: collections.Counter = field(default_factory=collections.Counter)  # tier at acquire
    activations: collections.Counter = field(default_factory=collections.Counter)  # slot hit / install
    loads: int = 0
    load_failures: int = 0
    cache_evictions: int = 0
    slot_evictions: int = 0
    load_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100_000))
    install_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100_000))
    cache_peak_bytes: int = 0
    waited: int = 0  # requests that could not be admitted at least once because their adapter was loading


class AdapterStore:
    """Registry + CPU cache + slots over one ``LoraManager`` (see the module docstring)."""

    def __init__(self, manager: LoraManager, config: StoreConfig | None = None) -> None:
        self.manager = manager
        self.config = config = config or StoreConfig()
        if config.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {config.max_loras}")
        self.roots = [Path(r).expanduser() for r in config.roots]
        for root in self.roots:
            if not root.is_dir():
                raise ValueError(f"adapter root {str(root)!r} is not a directory")
        self._entries: dict[str, _Entry] = {}
        self._cache: collections.OrderedDict[str, PreparedAdapter] = collections.OrderedDict()
        self._cache_bytes = 0
        self._slots: collections.OrderedDict[str, PreparedAdapter] = collections.OrderedDict()
        self._wanted: list[str] = []  # prefetch window, most urgent first
        self._promised: set[str] = set()  # ready() said yes; kept in the cache until activated
        self._loading: dict[str, int] = {}  # name -> generation being loaded
        self._failures: dict[str, Exception] = {}
        self._waiting_owners: set[str] = set()
        self.stats_ = StoreStats()
        self._lock = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._element_size = next(manager.model.parameters()).element_size()
        for name, info in manager.adapters.items():  # adapters loaded before the store existed: pinned
            self._entries[name] = _Entry(name, info.source, from_root=False, pinned=True)
            self._slots[name] = manager.export(name)

    # -- registry ----------------------------------------------------------------------------------
    def register(self, name: str, source: str | Path) -> None:
        """Make ``name`` available; nothing is read until a request uses it."""
        if not isinstance(name, str) or not name or "\x00" in name:
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        if name.startswith(PREFIX):
            raise AdapterError(f"adapter names may not start with {PREFIX!r} (reserved for mixtures)")
        entry = self._entries.get(name)
        if entry is not None and not entry.from_root:
            raise AdapterError(f"adapter {name!r} is already registered (from {entry.source})")
        text = str(source)
        try:
            exists = Path(source).expanduser().exists()
        except (OSError, RuntimeError) as exc:  # a name too long, "~user" without a home
            raise AdapterError(f"adapter {name!r}: cannot use {text[:200]!r}: {os_reason(exc)}") from None
        if not exists and (text.startswith((".", "/", "~")) or text.count("/") != 1):
            raise AdapterError(f"adapter {name!r}: {text[:200]} does not exist")
        self._entries[name] = _Entry(name, text, from_root=False)

    def __contains__(self, name: str) -> bool:
        try:
            self._entry(name)
        except AdapterError:
            return False
        return True

    def list(self) -> dict[str, str]:
        """Registered adapters and the adapters found under the roots (scanned now): name -> source."""
        entries = list(self._entries.items())  # atomic copy: callers may be on another thread
        out = {n: e.source for n, e in entries if not e.from_root}
        for root in self.roots:
            for child in sorted(root.iterdir()):
                try:
                    if child.name in out or not (child / "adapter_config.json").is_file():
                        continue
                    path = contained_path(root, child.name)
                    check_files_inside(root, path, child.name)
                except (AdapterError, OSError):
                    continue  # a symlink out of the root (or a loop): not offered
                out[child.name] = str(path)
        return out

    def _entry(self, name: str) -> _Entry:
        """The entry for ``name``; adapters under a root get an entry on first use."""
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        if is_mixture(name):
            mixture = Mixture.from_key(name)
            for component in mixture.names:
                self._entry(component)
            entry = self._entries[name] = _Entry(name, name, from_root=True, mixture=mixture)
            return entry
        for root in self.roots:
            path = contained_path(root, name)
            try:
                found = (path / "adapter_config.json").is_file()
            except OSError as exc:
                raise AdapterError(f"adapter {name[:200]!r}: {os_reason(exc)}; refused") from None
            if found:
                check_files_inside(root, path, name)
                entry = _Entry(name, str(path), from_root=True, root=root)
                self._entries[name] = entry
                return entry
        where = f"; roots: {[str(r) for r in self.roots]}" if self.roots else ""
        known = sorted(n for n, e in self._entries.items() if not e.from_root)
        shown = f"{known[:20]}{' ...' if len(known) > 20 else ''}"
        raise AdapterError(f"unknown adapter {name[:200]!r}; registered adapters: {shown}{where}")

    def source(self, name: str) -> str:
        return self._entry(name).source

    # -- explicit load / unload --------------------------------------------------------------------
    def load(
        self,
        name: str,
        source: str | Path,
        *,
        replace: bool = False,
        wait: bool = False,
        pin: bool = False,
        prepared: PreparedAdapter | None = None,
    ) -> concurrent.futures.Future | None:
        """Register ``name`` and read + validate it now (errors raise here, changing nothing).

        An existing name needs ``replace=True``; if requests use it, the replace is refused
        (``AdapterInUseError``) or, with ``wait=True``, deferred: returns a future done at the swap.
        ``prepared``: the adapter already read and validated by ``prepare`` in another thread (an engine
        thread must not spend its time reading and checking files: it passes the result here).
        """
        old = self._entries.get(name)
        if old is not None and not replace and not old.from_root:
            raise AdapterError(
                f"adapter {name!r} is already registered (from {old.source}); pass replace=True"
            )
        if old is not None and old.pending is not None:
            raise AdapterInUseError(
                f"adapter {name!r} already has a pending {old.pending.action}; wait for it"
            )
        if prepared is None or prepared.name != name or prepared.source != str(source):
            prepared = self._prepare(name, str(source))
        if old is None:
            self.register(name, source)
            self._cache_put(name, prepared)
            if pin:
                self.pin(name)
            return None
        if self._users_of(old, old.generation) and not wait:
            raise self._in_use(old, "replace")
        old.source, old.from_root = str(source), False
        old.pending = _Pending("replace", concurrent.futures.Future(), prepared)
        future = old.pending.future
        self._maybe_finish_pending(old)
        if pin:
            old.pinned = True
        return None if future.done() else future

    def unload(self, name: str, *, wait: bool = False) -> concurrent.futures.Future | None:
        """Forget ``name`` and free its memory (an adapter under a root stays resolvable from disk).

        In use: ``AdapterInUseError``, or with ``wait=True`` a future done when its last request finished
        (new requests for it are refused meanwhile)."""
        entry = self._entries.get(name)
        if entry is None:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {sorted(self.list())}")
        if entry.pending is not None:
            raise AdapterInUseError(f"adapter {name!r} already has a pending {entry.pending.action}")
        if entry.users and not wait:
            raise self._in_use(entry, "unload")
        entry.pending = _Pending("unload", concurrent.futures.Future())
        future = entry.pending.future
        self._maybe_finish_pending(entry)
        return None if future.done() else future

    def pin(self, name: str) -> None:
        """Keep ``name`` in a slot of its own (loaded now if needed); pinned adapters never leave."""
        entry = self._entry(name)
        with self._lock:
            cached = name in self._cache or name in self._slots
        if not cached:
            self._cache_put(name, self._prepare(name, entry.source, entry.root))
        entry.pinned = True
        self.activate([name], busy=set())

    def unpin(self, name: str) -> None:
        self._entry(name).pinned = False

    def _in_use(self, entry: _Entry, action: str) -> AdapterInUseError:
        users = sorted(entry.users)
        return AdapterInUseError(
            f"adapter {entry.name!r} is used by {len(users)} unfinished request(s) (e.g. {users[0]}); "
            f"abort them or wait for them to finish before the {action} (or pass wait=True)"
        )

    def _users_of(self, entry: _Entry, generation: int) -> list[str]:
        return [owner for owner, gen in entry.users.items() if gen == generation]

    def _maybe_finish_pending(self, entry: _Entry) -> None:
        pending = entry.pending
        if pending is None or self._users_of(entry, entry.generation):
            return
        self._evict_everywhere(entry.name)
        for other in list(self._entries.values()):  # mixtures built from the old weights
            if other.mixture is not None and entry.name in other.mixture.names:
                self._evict_everywhere(other.name)
        entry.pending = None
        if pending.action == "unload":
            if not entry.users:
                del self._entries[entry.name]
        else:
            entry.generation += 1
            entry.version = next(_VERSIONS)
            entry.error = None
            entry.nbytes = pending.prepared.nbytes
            self._cache_put(entry.name, pending.prepared)
            if entry.pinned:
                self.activate([entry.name], busy=set())
        pending.future.set_result(None)

    def _evict_everywhere(self, name: str) -> None:
        if name in self._slots:
            del self._slots[name]
            self.manager.unload(name)
        with self._lock:
            self._cache_pop(name)
            self._loading.pop(name, None)  # a load in flight for the old generation is discarded

    # -- request references ------------------------------------------------------------------------
    def acquire(self, name: str, owner: str) -> None:
        """A request starts using ``name`` (raises ``AdapterError`` for unknown or departing adapters)."""
        entry = self._entry(name)
        pending = entry.pending
        if pending is not None and pending.action == "unload":
            raise AdapterError(f"adapter {name!r} is being unloaded; it accepts no new requests")
        if entry.mixture is not None:
            done = []
            try:
                for component in entry.mixture.names:
                    self.acquire(component, owner)
                    done.append(component)
            except AdapterError:
                for component in done:
                    self.release(component, owner)
                raise
        entry.users[owner] = entry.generation + (1 if pending is not None else 0)
        with self._lock:
            tier = "slot" if name in self._slots else "cache" if name in self._cache else "disk"
            self.stats_.arrivals[tier] += 1

    def release(self, name: str, owner: str) -> None:
        self._waiting_owners.discard(owner)
        entry = self._entries.get(name)
        if entry is None or entry.users.pop(owner, None) is None:
            return
        if entry.mixture is not None:
            for component in entry.mixture.names:
                self.release(component, owner)
        self._maybe_finish_pending(entry)

    # -- engine step hooks -------------------------------------------------------------------------
    def ready(self, name: str, owner: str | None = None) -> bool:
        """Whether a request of ``owner`` for ``name`` can be admitted now without reading the disk."""
        entry = self._entries.get(name)
        if entry is None or entry.error is not None:
            return False
        if owner is not None and entry.users.get(owner, entry.generation) != entry.generation:
            return False  # arrived during a pending replace: waits for the new weights
        if entry.mixture is not None and owner is not None:
            for component in entry.mixture.names:
                c = self._entries.get(component)
                if c is None or c.users.get(owner, c.generation) != c.generation:
                    return False
        if self._promise(name):
            return True
        if owner is not None and owner not in self._waiting_owners:
            self._waiting_owners.add(owner)
            self.stats_.waited += 1
        if not self.config.background:
            for component in entry.mixture.names if entry.mixture is not None else ():
                self._load_now(component)
            self._load_now(name)
            return self._promise(name)
        return False

    def _promise(self, name: str) -> bool:
        with self._lock:
            if name in self._slots or name in self._cache:
                self._promised.add(name)
                return True
        return False

    def prefetch(self, names: Iterable[str]) -> None:
        """Adapters of waiting requests, most urgent first: load the head of the list in the background
        (up to ``prefetch_depth`` distinct adapters and what the CPU budget holds)."""
        depth = self.config.prefetch_depth or self.config.max_loras
        window: list[str] = []
        budget = self.config.cpu_cache_bytes
        for name in dict.fromkeys(self._expand(names)):
            entry = self._entries.get(name)
            if entry is None or entry.error is not None:
                continue
            size = entry.nbytes or self._estimate(entry)
            if window and size > budget:
                break
            budget -= size
            window.append(name)
            if len(window) >= depth:
                break
        with self._lock:
            self._wanted = window
            self._promised.clear()  # promises live from one schedule to its activate
            self._lock.notify_all()
            if any(n not in self._cache and n not in self._slots and n not in self._loading for n in window):
                self._start_thread()
                self._lock.notify_all()

    def _expand(self, names: Iterable[str]) -> Iterable[str]:
        """Mixtures come after their components (which they are built from)."""
        for name in names:
            entry = self._entries.get(name)
            if entry is not None and entry.mixture is not None:
                yield from entry.mixture.names
            yield name

    def _estimate(self, entry: _Entry) -> int:
        if entry.mixture is None:
            return _estimate_bytes(entry.source, self._element_size)
        parts = [self._entries.get(n) for n in entry.mixture.names]
        return sum(p.nbytes or _estimate_bytes(p.source, self._element_size) for p in parts if p is not None)

    def activate(self, names: Iterable[str], busy: set[str]) -> None:
        """Install ``names`` in slots (from the CPU cache), evicting LRU slots that ``busy`` adapters and
        pinned ones do not hold. Called by the engine after scheduling, before running the step."""
        for name in names:
            if name in self._slots:
                self._slots.move_to_end(name)
                self.stats_.activations["slot_hit"] += 1
                continue
            with self._lock:
                prepared = self._cache.get(name)
                if prepared is None:
                    raise RuntimeError(f"adapter {name!r} was scheduled but is not in the CPU cache")
                self._cache.move_to_end(name)
            self._free_slot_for(name, busy | set(names))
            t0 = time.perf_counter()
            self.manager.install(prepared)
            self.stats_.install_seconds.append(time.perf_counter() - t0)
            self._slots[name] = prepared
            self.stats_.activations["install"] += 1
        with self._lock:
            self._promised.clear()
            self._lock.notify_all()  # a loaded adapter may wait for promised cache space

    def _free_slot_for(self, name: str, keep: set[str]) -> None:
        pinned = {n for n in self._slots if self._entries.get(n) is not None and self._entries[n].pinned}
        entry = self._entries.get(name)
        if entry is not None and entry.pinned:
            return
        while len(self._slots) - len(pinned) >= self.config.max_loras:
            victim = next((n for n in self._slots if n not in keep and n not in pinned), None)
            if victim is None:
                raise RuntimeError(
                    f"no free adapter slot for {name!r}: all {self.config.max_loras} slots are in use"
                )
            prepared = self._slots.pop(victim)
            self.manager.unload(victim)
            self.stats_.slot_evictions += 1
            if self.manager_on_cpu:
                with self._lock:  # the slot's tensors are the prepared ones: keep them if they fit
                    if victim not in self._cache and victim in self._entries:
                        self._cache_put_locked(victim, prepared, required=False)

    @property
    def manager_on_cpu(self) -> bool:
        param = next(self.manager.model.parameters())
        return param.device.type == "cpu"

    def slot(self, name: str) -> int:
        return self.manager.slot(name)

    def identity(self, name: str) -> str:
        """What ``name`` computes now, for caches keyed by adapter (the prefix cache): its name and a version
        that changes when it is replaced or unloaded and registered again; a mixture's names its components'."""
        entry = self._entry(name)
        if entry.mixture is not None:
            return name + "@" + ",".join(str(self._entry(c).version) for c in entry.mixture.names)
        return f"{name}@{entry.version}"

    def loading(self) -> bool:
        """Whether the loader has work (the engine may wait for it instead of spinning)."""
        with self._lock:
            return bool(self._loading) or any(
                n not in self._cache and n not in self._slots for n in self._wanted
            )

    def wait_for_load(self, timeout: float) -> None:
        with self._lock:
            if self._loading or self._wanted:
                self._lock.wait(timeout)

    def take_failures(self) -> dict[str, Exception]:
        """Adapters whose background load failed since the last call; their error is cleared, so a later
        request retries the load."""
        with self._lock:
            failures, self._failures = self._failures, {}
        for name in failures:
            entry = self._entries.get(name)
            if entry is not None:
                entry.error = None
        return failures

    # -- loading -----------------------------------------------------------------------------------
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
        if prepared.nbytes > self.config.cpu_cache_bytes:
            raise AdapterError(
                f"adapter {name!r} needs {prepared.nbytes / 2**20:.1f} MiB, more than the whole CPU cache "
                f"budget ({self.config.cpu_cache_bytes / 2**20:.1f} MiB); raise cpu_cache_bytes"
            )
        with self._lock:
            self.stats_.loads += 1
            self.stats_.load_seconds.append(time.perf_counter() - t0)
        return prepared

    def _load_now(self, name: str) -> None:
        """Load ``name`` into the cache in this thread (the loader thread, or inline without one)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or name in self._cache or name in self._slots:
                return
            generation, source = entry.generation, entry.source
            self._loading[name] = generation
        try:
            mixed = entry.mixture is not None
            prepared = self._mix(entry) if mixed else self._prepare(name, source, entry.root)
        except Exception as exc:
            with self._lock:
                self.stats_.load_failures += 1
                if self._loading.pop(name, None) == generation and entry.generation == generation:
                    entry.error = exc
                    self._failures[name] = exc
                self._lock.notify_all()
            log.warning("loading adapter %r failed: %s", name, exc)
            return
        with self._lock:
            deadline = time.monotonic() + 1.0
            while self._promised and not self._fits(prepared) and time.monotonic() < deadline:
                self._lock.wait(0.05)  # space held for this step's admissions frees at activate()
            if self._loading.pop(name, None) == generation and entry.generation == generation:
                entry.nbytes = prepared.nbytes
                self._cache_put_locked(name, prepared)
            self._lock.notify_all()

    def _mix(self, entry: _Entry) -> PreparedAdapter:
        with self._lock:
            parts = [(self._cache.get(n) or self._slots.get(n), w) for n, w in entry.mixture.weights]
        missing = [n for (p, _), n in zip(parts, entry.mixture.names, strict=True) if p is None]
        if missing:
            raise RuntimeError(f"mixture {entry.name}: components {missing} are not loaded")
        return combine(entry.name, parts)

    def _start_thread(self) -> None:
        if self._thread is None and self.config.background and not self._closed:
            self._thread = threading.Thread(target=self._loader, name="blora-adapter-loader", daemon=True)
            self._thread.start()

    def _loader(self) -> None:
        kernels.one_openmp_thread()  # small copies; a second OpenMP team would slow the engine's ops
        while True:
            with self._lock:
                name = self._next_wanted()
                while name is None and not self._closed:
                    self._lock.wait()
                    name = self._next_wanted()
                if self._closed:
                    return
            self._load_now(name)

    def _next_wanted(self) -> str | None:
        for name in self._wanted:
            entry = self._entries.get(name)
            if (
                entry is not None
                and entry.error is None
                and name not in self._cache
                and name not in self._slots
                and name not in self._loading
                and (entry.mixture is None or all(self._loaded(n) for n in entry.mixture.names))
            ):
                return name
        return None

    def _loaded(self, name: str) -> bool:
        return name in self._cache or name in self._slots

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the CPU cache -----------------------------------------------------------------------------
    def _cache_put(self, name: str, prepared: PreparedAdapter) -> None:
        with self._lock:
            self._cache_put_locked(name, prepared)

    def _cache_put_locked(self, name: str, prepared: PreparedAdapter, required: bool = True) -> None:
        """Insert as most recent, evicting LRU entries that no waiting request needs soon. An entry that is
        not ``required`` (a slot's weights kept for later) is dropped instead if it does not fit."""
        self._cache_pop(name)
        keep = set(self._wanted) | self._promised | {name}
        victims = [n for n in self._cache if n not in keep]
        budget, count = self.config.cpu_cache_bytes, self.config.max_cpu_loras
        freeable = sum(self._cache[n].nbytes for n in victims)
        too_many = count is not None and len(self._cache) - len(victims) + 1 > count
        if not required and (self._cache_bytes - freeable + prepared.nbytes > budget or too_many):
            return
        self._cache[name] = prepared
        self._cache_bytes += prepared.nbytes
        for victim in victims:
            if self._cache_bytes <= budget and (count is None or len(self._cache) <= count):
                break
            self._cache_pop(victim)
            self.stats_.cache_evictions += 1
        self.stats_.cache_peak_bytes = max(self.stats_.cache_peak_bytes, self._cache_bytes)

    def _fits(self, prepared: PreparedAdapter) -> bool:
        keep = set(self._wanted) | self._promised
        freeable = sum(p.nbytes for n, p in self._cache.items() if n not in keep and n != prepared.name)
        return self._cache_bytes - freeable + prepared.nbytes <= self.config.cpu_cache_bytes

    def _cache_pop(self, name: str) -> None:
        prepared = self._cache.pop(name, None)
        if prepared is not None:
            self._cache_bytes -= prepared.nbytes

    # -- introspection -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Tiers, hit counts, load/install latencies (ms, p50/p99) and memory in bytes."""
        with self._lock:
            s = self.stats_
            resident = dict(self._cache)
            resident.update(self._slots)
            return {
                "registered": sum(not e.from_root for e in self._entries.values()),
                "roots": [str(r) for r in self.roots],
                "cached": list(self._cache),
                "active": list(self._slots),
                "pinned": [n for n, e in self._entries.items() if e.pinned],
                "arrivals": dict(s.arrivals),
                "requests_waited_for_load": s.waited,
                "activations": dict(s.activations),
                "loads": s.loads,
                "load_failures": s.load_failures,
                "cache_evictions": s.cache_evictions,
                "slot_evictions": s.slot_evictions,
                "load_ms": _percentiles(s.load_seconds),
                "install_ms": _percentiles(s.install_seconds),
                "install_total_ms": round(1000 * sum(s.install_seconds), 3),
                "cache_bytes": self._cache_bytes,
                "cache_peak_bytes": s.cache_peak_bytes,
                "cache_budget_bytes": self.config.cpu_cache_bytes,
                "slot_bytes": sum(p.nbytes for p in self._slots.values()),
                "resident_bytes": sum(p.nbytes for p in resident.values()),
            }


def _percentiles(values: Iterable[float]) -> dict[str, float]:
    data = sorted(values)
    if not data:
        return {"n": 0}

    def pick(q: float) -> float:
        return round(1000 * data[min(len(data) - 1, int(q * len(data)))], 3)

    return {"n": len(data), "p50": pick(0.5), "p99": pick(0.99), "max": round(1000 * data[-1], 3)}


def _estimate_bytes(source: str, element_size: int) -> int:
    """Upper bound of an adapter's prepared size before its first load, from its weights file's size
    (stored in 16 bits or more per value, prepared in the model's dtype)."""
    for fname in _WEIGHT_FILES[1:]:
        try:
            return (Path(source) / fname).stat().st_size * max(1, element_size // 2)
        except OSError:
            continue
    return 0


__all__ = ["AdapterInUseError", "AdapterStore", "StoreConfig", "contained_path", "resolve_adapter_dir"]
