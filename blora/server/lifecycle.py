"""Admission (bounded queue -> 429), request tracking, and graceful shutdown (SIGTERM -> 503 + drain).

Admission counts generation requests the server has accepted and not yet finished. The bound is
``max_num_seqs + max_queue``: the engine's running batch plus a waiting queue of ``max_queue`` requests.
Counting at the server (not from ``engine.stats()``) keeps the decision exact under bursts, before the
engine has seen the new requests.

Each ticket also pins the adapters its request uses (``AdapterPins``), from the moment the model name is
resolved until the request ends. An unload is refused while an adapter is pinned, and while an unload is in
progress the adapter no longer resolves (404): the engine never receives a request for an adapter that
was unloaded between the server's check and the engine's submission.

On SIGTERM (or SIGINT) the server stops admitting work (every new request gets 503, ``/health`` too), waits
up to ``drain_timeout`` seconds for in-flight requests to finish, aborts whatever is left, then lets
uvicorn close connections and exit with status 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import anyio
import uvicorn

from blora.engine.client import EngineClient
from blora.server.errors import InvalidRequestError, NotFoundError, QueueFullError, ShuttingDownError, clip

logger = logging.getLogger("blora.server")


class AdapterPins:
    """Adapters in use by admitted requests, and adapters being unloaded.

    Everything here runs on the event loop, so a check and the pin that follows it (in the same turn) are
    atomic with respect to an unload.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.unloading: set[str] = set()

    def check(self, model: str, names: tuple[str, ...]) -> None:
        """404 if one of ``names`` is being unloaded (it may already be gone from the engine)."""
        gone = [name for name in names if name in self.unloading]
        if gone:
            raise NotFoundError(
                f"The model {clip(model)!r} does not exist: adapter {clip(gone[0])!r} is being unloaded",
                param="model",
            )

    def pin(self, names: tuple[str, ...]) -> None:
        self.counts.update(names)

    def unpin(self, names: tuple[str, ...]) -> None:
        self.counts.subtract(names)
        for name in names:
            if self.counts[name] <= 0:
                del self.counts[name]

    @contextmanager
    def unloading_of(self, name: str) -> Iterator[None]:
        """Mark ``name`` as being unloaded for the duration; 400 if requests in flight use it."""
        if self.counts[name] > 0:
            raise InvalidRequestError(
                f"Failed to unload adapter {clip(name)!r}: it is used by {self.counts[name]} unfinished "
                "request(s); unload it when they have finished",
                param="lora_name",
                code="adapter_in_use",
            )
        self.unloading.add(name)
        try:
            yield
        finally:
            self.unloading.discard(name)


class Ticket:
    """One admitted request and the adapters it pins; ``release()`` is idempotent."""

    def __init__(self, lifecycle: Lifecycle, request_id: str, adapters: tuple[str, ...] = ()) -> None:
        self.lifecycle = lifecycle
        self.request_id = request_id
        self.adapters = adapters
        self.engine_ids: list[str] = []
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.lifecycle._release(self)


class Lifecycle:
    def __init__(
        self, capacity: int | None, retry_after_s: int = 1, on_change: Callable[[int], None] | None = None
    ) -> None:
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.draining = False
        self.tickets: dict[str, Ticket] = {}
        self.pins = AdapterPins()
        self._on_change = on_change  # callback(in_flight: int), for the metrics gauge

    @property
    def in_flight(self) -> int:
        return len(self.tickets)

    def check_accepting(self) -> None:
        if self.draining:
            raise ShuttingDownError("The server is shutting down and does not accept new requests")

    def admit(self, request_id: str, adapters: tuple[str, ...] = ()) -> Ticket:
        """A ticket for a new request (429 when full, 503 while draining); pins ``adapters`` until released."""
        self.check_accepting()
        if self.capacity is not None and len(self.tickets) >= self.capacity:
            raise QueueFullError(
                f"The request queue is full ({len(self.tickets)} requests in flight, limit "
                f"{self.capacity}); retry after {self.retry_after_s} s",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        ticket = Ticket(self, request_id, adapters)
        self.tickets[request_id] = ticket
        self.pins.pin(adapters)
        self._changed()
        return ticket

    def _release(self, ticket: Ticket) -> None:
        self.tickets.pop(ticket.request_id, None)
        self.pins.unpin(ticket.adapters)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self.tickets))

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.tickets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.tickets

    async def drain(self, engine: EngineClient, timeout: float) -> None:
        """Stop admitting, wait for in-flight requests up to ``timeout``, abort the rest."""
        self.draining = True
        logger.info("draining: %d request(s) in flight, waiting up to %.1f s", self.in_flight, timeout)
        if await self.wait_idle(timeout):
            logger.info("drained: all in-flight requests finished")
            return
        left = [rid for t in list(self.tickets.values()) for rid in t.engine_ids]
        logger.warning("drain timeout: aborting %d engine request(s)", len(left))
        for rid in left:
            await abort_quietly(engine, rid)
        await self.wait_idle(5.0)


async def abort_quietly(engine: EngineClient, request_id: str) -> None:
    """Abort an engine request, shielded from cancellation (called from cleanup paths)."""
    with anyio.CancelScope(shield=True):
        try:
            await engine.abort(request_id)
        except Exception:  # already finished or unknown: nothing to free
            logger.debug("abort of %s failed", request_id, exc_info=True)


class DrainingServer(uvicorn.Server):
    """uvicorn server whose first SIGTERM/SIGINT drains before exiting (and exits 0)."""

    def __init__(
        self, config: uvicorn.Config, lifecycle: Lifecycle, engine: EngineClient, drain_timeout: float
    ) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.engine = engine
        self.drain_timeout = drain_timeout
        self._drain_requested = False
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested:  # second signal: stop now
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        logger.info("received %s: draining", signal.Signals(sig).name)
        self._drain_requested = True
        self.lifecycle.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        try:
            await self.lifecycle.drain(self.engine, self.drain_timeout)
        finally:
            self.should_exit = True
