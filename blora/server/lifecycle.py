"""Admission (bounded queue -> 429), request tracking, and graceful shutdown (SIGTERM -> 503 + drain).

Admission counts generation requests the server has accepted and not yet finished. The bound is
``max_num_seqs + max_queue``: the engine's running batch plus a waiting queue of ``max_queue`` requests.
Counting at the server (not from ``engine.stats()``) keeps the decision exact under bursts, before the
engine has seen the new requests.

On SIGTERM (or SIGINT) the server stops admitting work (every new request gets 503, ``/health`` too), waits
up to ``drain_timeout`` seconds for in-flight requests to finish, aborts whatever is left, then lets
uvicorn close connections and exit with status 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from types import FrameType
from typing import Any

import anyio
import uvicorn

from blora.server.errors import QueueFullError, ShuttingDownError

logger = logging.getLogger("blora.server")


class Ticket:
    """One admitted request; ``release()`` is idempotent."""

    def __init__(self, lifecycle: Lifecycle, request_id: str) -> None:
        self.lifecycle = lifecycle
        self.request_id = request_id
        self.engine_ids: list[str] = []
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.lifecycle._release(self)


class Lifecycle:
    def __init__(self, capacity: int | None, retry_after_s: int = 1, on_change: Any = None) -> None:
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.draining = False
        self.tickets: dict[str, Ticket] = {}
        self._on_change = on_change  # callback(in_flight: int), for the metrics gauge

    @property
    def in_flight(self) -> int:
        return len(self.tickets)

    def check_accepting(self) -> None:
        if self.draining:
            raise ShuttingDownError("The server is shutting down and does not accept new requests")

    def admit(self, request_id: str) -> Ticket:
        self.check_accepting()
        if self.capacity is not None and len(self.tickets) >= self.capacity:
            raise QueueFullError(
                f"The request queue is full ({len(self.tickets)} requests in flight, limit "
                f"{self.capacity}); retry after {self.retry_after_s} s",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        ticket = Ticket(self, request_id)
        self.tickets[request_id] = ticket
        self._changed()
        return ticket

    def _release(self, ticket: Ticket) -> None:
        self.tickets.pop(ticket.request_id, None)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self.tickets))

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.tickets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.tickets

    async def drain(self, engine: Any, timeout: float) -> None:
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


async def abort_quietly(engine: Any, request_id: str) -> None:
    """Abort an engine request, shielded from cancellation (called from cleanup paths)."""
    with anyio.CancelScope(shield=True):
        try:
            result = engine.abort(request_id)
            if inspect.isawaitable(result):
                await result
        except Exception:  # already finished or unknown: nothing to free
            logger.debug("abort of %s failed", request_id, exc_info=True)


class DrainingServer(uvicorn.Server):
    """uvicorn server whose first SIGTERM/SIGINT drains before exiting (and exits 0)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, engine: Any, drain_timeout: float):
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
