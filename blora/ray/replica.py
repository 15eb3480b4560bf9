"""``EngineReplica``: one ``AsyncLLM`` per Serve replica; adapters made resident by Ray's model multiplexing.

The ingress routes each adapter request with ``multiplexed_model_id=<adapter>``, so Ray sends it to a
replica that already holds that adapter (or, if none does, to the one holding fewest). Here the
``@serve.multiplexed`` loader makes the adapter resident in this replica's engine (read and validated now)
and Ray's LRU eviction unloads it from the engine, so Ray's routing table and the engine agree on what
each replica holds. Many adapters stay resident at once and the engine batches them together.

"Resident" is the engine's adapter store's notion (``AdapterStore.registered``: loaded by name and not
being unloaded), less the adapters whose unload this replica has started and the engine not yet done.

Ordering that keeps every request safe from an unload racing it: a request that found its adapter resident
submits itself to the engine without yielding to the event loop in between, so its submission is queued
before any unload an eviction starts afterwards, and the engine's waiting unload lets it finish. A request
that arrives after the eviction misses, and its load first waits for that unload to complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from blora.engine.memory import freeze_startup_heap
from blora.engine.wire import Packed, Packer

logger = logging.getLogger("blora.ray")

MIXTURE_ATTEMPTS = 3  # loads of a mixture's components before giving up (others may evict them meanwhile)


@dataclass
class ReplicaOptions:
    """``max_adapters``: adapters resident at once (Ray's ``max_num_models_per_replica``); ``threads``:
    torch intra-op threads (None: leave torch's default); ``report_interval_s``: stats to the registry."""

    max_adapters: int = 16
    threads: int | None = None
    report_interval_s: float = 0.5
    drain_timeout_s: float = 30.0


class _Resident:
    """What Ray's multiplexer caches for one adapter. Ray calls the object's ``__del__`` attribute when its
    LRU evicts the adapter; it is an instance attribute on purpose, so the garbage collector (which only
    looks at the class) never calls it a second time."""

    def __init__(self, name: str, source: str, on_evict: Any) -> None:
        self.name = name
        self.source = source

        async def evicted() -> None:
            on_evict(name)

        self.__del__ = evicted


@serve.deployment(name="EngineReplica")
class EngineReplica:
    """One engine; generation requests stream packed outputs (``blora.engine.wire``) back to the ingress."""

    # Ray Serve awaits an async constructor of a deployment (the engine loads in a thread meanwhile)
    async def __init__(self, engine_kwargs: dict, registry: Any, options: ReplicaOptions) -> None:  # type: ignore[misc]
        import torch

        from blora.engine import AsyncLLM

        if options.threads:
            torch.set_num_threads(options.threads)
        self.engine = AsyncLLM(**engine_kwargs)
        freeze_startup_heap()
        self.registry = registry
        self.options = options
        self.name = f"{serve.get_replica_context().replica_tag}@{socket.gethostname()}:{os.getpid()}"
        self._version = 0
        self._sources: dict[str, str] = {}  # the registry as last read
        self._announced: dict[str, str] = {}  # sources of runtime loads not registered yet
        self._unloading: dict[str, asyncio.Task] = {}  # unloads started here (Ray evicted or source changed)
        self._locks: dict[str, asyncio.Lock] = {}
        self._sync_lock = asyncio.Lock()
        self.counts = {"adapter_requests": 0, "adapter_hits": 0, "adapter_loads": 0, "adapter_evictions": 0}

        async def load_adapter(name: str) -> _Resident:  # a plain function: Ray stores its state on it
            return await self._make_resident(name)

        self._multiplexed = serve.multiplexed(max_num_models_per_replica=options.max_adapters)(load_adapter)
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())
        # Serve calls ``__del__`` at graceful shutdown; set per instance so the garbage collector never does.
        self.__del__ = self._shutdown

    # -- called by the ingress -----------------------------------------------------------------------
    async def describe(self) -> dict:
        """What the ingress needs to tokenize and check requests exactly as this engine does."""
        return {"tokenizer": self.engine.tokenizer, "limits": self.engine.limits}

    async def generate(
        self,
        prompt: list[int] | str,
        params: Any,
        adapter: str | dict[str, float] | None,
        request_id: str,
        version: int,
    ) -> AsyncIterator[Packed]:
        """Stream one engine request. Raises what ``AsyncLLM.generate`` raises (``ValueError`` for a bad
        request) and ``ValueError`` for an adapter the registry does not know."""
        await self._sync(version)
        names = [] if adapter is None else [adapter] if isinstance(adapter, str) else sorted(adapter)
        await self._ensure_resident(names)
        # No await between the residency check above and the engine's queueing of the request below.
        packer = Packer()
        async for out in self.engine.generate(prompt, params, adapter=adapter, request_id=request_id):
            yield packer.pack(out)

    async def load(self, name: str, source: str, version: int) -> None:
        """A runtime load: read and validate ``source`` now (errors raise here) and keep it resident."""
        await self._sync(version)
        self._announced[name] = source
        try:
            await self._ensure_resident([name])
        finally:
            self._announced.pop(name, None)

    # -- residency -------------------------------------------------------------------------------------
    def _resident(self) -> dict[str, str]:
        """Adapters resident in this replica's engine (name -> source), read from its store now."""
        loaded = self.engine.engine.store.registered()
        return {n: s for n, s in loaded.items() if n not in self._unloading or self._unloading[n].done()}

    async def _ensure_resident(self, names: list[str]) -> None:
        if not names:
            return
        if len(names) > self.options.max_adapters:
            raise ValueError(
                f"adapter_mixture names {len(names)} adapters but a replica keeps at most "
                f"{self.options.max_adapters} resident (--max-adapters-per-replica)"
            )
        self.counts["adapter_requests"] += 1
        if all(n in self._resident() for n in names):
            self.counts["adapter_hits"] += 1
        for _ in range(MIXTURE_ATTEMPTS):
            for name in names:
                await self._multiplexed(name)
                if name not in self._resident():  # Ray's cache entry outlived a registry change
                    await self._make_resident(name)
            resident = self._resident()
            if all(n in resident for n in names):
                return
        raise RuntimeError(
            f"adapters {names} could not be resident together: other requests evicted them "
            f"{MIXTURE_ATTEMPTS} times; raise --max-adapters-per-replica"
        )

    async def _make_resident(self, name: str) -> _Resident:
        """Load ``name`` into the engine (once; concurrent callers share the load)."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            source = self._resident().get(name)
            if source is not None:
                return _Resident(name, source, self._evict)
            pending = self._unloading.pop(name, None)
            if pending is not None:
                await pending
            source = await self._source_of(name)
            await self.engine.load_adapter(name, source)
            self.counts["adapter_loads"] += 1
            return _Resident(name, source, self._evict)

    async def _source_of(self, name: str) -> str:
        source = self._announced.get(name) or self._sources.get(name)
        if source is None:  # registered after our last sync
            await self._sync(self._version + 1)
            source = self._sources.get(name)
        if source is None:
            raise ValueError(f"unknown adapter {name!r}: it is not registered in the cluster")
        return source

    def _evict(self, name: str) -> None:
        """Ray's LRU dropped ``name``: unload it from the engine once its running requests finish."""
        self.counts["adapter_evictions"] += 1
        self._drop(name)

    def _drop(self, name: str) -> None:
        if name in self._resident():
            self._unloading[name] = asyncio.ensure_future(self._unload(name))

    async def _unload(self, name: str) -> None:
        try:
            await self.engine.unload_adapter(name, wait=True)
        except Exception:
            logger.exception("unloading adapter %r failed", name)

    async def _sync(self, version: int) -> None:
        """Re-read the registry if it changed; drop adapters removed from it or now loaded from elsewhere."""
        if version <= self._version:
            return
        async with self._sync_lock:
            if version <= self._version:
                return
            self._version, self._sources = await self.registry.snapshot.remote()
            for name, source in self._resident().items():
                if self._sources.get(name) != source and name not in self._announced:
                    self._drop(name)

    # -- stats ---------------------------------------------------------------------------------------
    def _stats(self) -> dict:
        return {
            **self.engine.stats(),
            **self.counts,
            "replica": self.name,
            "pid": os.getpid(),
            "resident_adapters": sorted(self._resident()),
        }

    async def _report_loop(self) -> None:
        while True:
            try:
                version = await self.registry.report.remote(self.name, self._stats())
                await self._sync(version)
            except Exception:
                logger.warning("reporting to the adapter registry failed", exc_info=True)
            await asyncio.sleep(self.options.report_interval_s)

    async def _shutdown(self) -> None:
        """Serve's graceful shutdown: stop reporting, let running requests finish, stop the engine."""
        self._reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reporter
        await self.engine.shutdown(drain_timeout=self.options.drain_timeout_s)
