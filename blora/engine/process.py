"""``EngineProcess``: the engine in a process of its own, served to this one as an ``EngineClient``.

Why: in one process the engine thread and the event loop share the GIL. The engine's forward is hundreds of
short torch and kernel calls, each of which gives the GIL up and takes it back; while the event loop holds
it (parsing requests, writing a step's stream chunks), the engine waits, with its OpenMP team idle. Measured
on 2 cores (SmolLM2, bf16, ``LLM.generate`` of 32 x 64 tokens): a thread of the same process that holds
the GIL for 1.5 ms every 30 ms cost the engine 4% throughput, the same work in another process nothing
measurable. So ``blora serve`` runs the engine in a child process (vLLM's engine core process does the same)
and this process keeps HTTP, tokenization and streaming.

The child runs an ``AsyncLLM`` (its engine thread steps as in one process) and a small command loop; the
pipe between them carries, one way, requests, aborts and calls (adapter loads and unloads, prefix-cache
reset, shutdown), and the other way, one message per engine step with every output of the step (each
reduced to its increments by ``blora.engine.wire``: O(1) per token) and the engine's stats, and the replies
to calls. What the server reads synchronously (tokenizer, limits, stats, the adapters served) lives here:
the tokenizer and limits come once from the child, the stats with every step, and the registered adapters
with every reply; adapters found under an ``adapter_root`` are looked up here, as the engine does.

Failure: if the child dies, every open stream ends with ``EngineDeadError`` and new requests are refused
with it (the server answers 503); if this process dies, the child sees the pipe close and exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import pickle
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

from blora.engine.async_llm import AsyncLLM, _call_soon, _put_all, _Stream
from blora.engine.client import EngineLimits
from blora.engine.memory import freeze_startup_heap
from blora.engine.outputs import RequestOutput
from blora.engine.sampling_params import SamplingParams
from blora.engine.structured import StructuredOutputs
from blora.engine.wire import Packer, Unpacker
from blora.lora.store.registry import Registry

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # after a shutdown's drain: how long the child may take to exit before it is killed
E = TypeVar("E", bound=BaseException)
CALLS = frozenset({"abort", "load_adapter", "unload_adapter", "reset_prefix_cache", "shutdown"})


class EngineDeadError(RuntimeError):
    """The engine process has exited (its log says why); nothing more can run on it."""


class EngineProcess:
    """An ``AsyncLLM`` in a child process (see the module docstring). Takes ``AsyncLLM``'s arguments (the
    model as a path, hub id or None for the embedded default: they are sent to the child), plus
    ``threads`` (the child's torch threads; None: torch's default) and ``log_level`` (the child's logging)."""

    def __init__(
        self,
        model: str | None = None,
        adapters: dict[str, str] | None = None,
        *,
        threads: int | None = None,
        log_level: str = "INFO",
        **engine_kwargs: Any,
    ) -> None:
        # spawn: a fresh interpreter, with no threads or CUDA state inherited from this one
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        kwargs = dict(model=model, adapters=adapters, **engine_kwargs)
        self._process = context.Process(
            target=_core_main, args=(child, kwargs, threads, log_level), name="blora-engine", daemon=True
        )
        self._process.start()
        child.close()  # the child holds its end: EOF here when it exits
        try:
            kind, info = self._conn.recv()
        except (EOFError, OSError):
            self._process.join()
            raise EngineDeadError(
                f"the engine process exited while starting (exit code {self._process.exitcode}); "
                "its log above says why"
            ) from None
        if kind == "failed":
            self._process.join()
            raise _restore(info)
        self.tokenizer = info["tokenizer"]
        self.limits: EngineLimits = info["limits"]
        self.max_model_len: int = info["max_model_len"]
        self._stop_token_ids: list[int] = info["stop_token_ids"]
        self._roots = Registry(tuple(info["roots"]))  # adapters found by name under a root, looked up here
        self._registered: dict[str, str] = info["adapters"]
        self._stats: dict = info["stats"]
        self._structured: StructuredOutputs | None = None
        self._streams: dict[str, tuple[_Stream, Unpacker]] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._lock = threading.Lock()  # _streams, _calls, _dead
        self._send_lock = threading.Lock()
        self._accepting = True
        self._stopping = False
        self._dead: EngineDeadError | None = None
        self._reader = threading.Thread(target=self._read, name="blora-engine-reader", daemon=True)
        self._reader.start()

    # -- what the server reads synchronously ------------------------------------------------------------
    @property
    def structured_outputs(self) -> StructuredOutputs:
        """A grammar compiler for the engine's tokenizer and vocabulary (requests are checked with it here;
        the engine compiles its own copy, in a worker thread of its process)."""
        if self._structured is None:
            self._structured = StructuredOutputs(self.tokenizer, self.limits.vocab_size, self._stop_token_ids)
        return self._structured

    def list_adapters(self) -> dict[str, str]:
        """Registered adapters, then those under the roots (scanned now): name -> source."""
        out = dict(self._registered)
        for name, source in self._roots.list().items():
            out.setdefault(name, source)
        return out

    def adapter_source(self, name: str) -> str | None:
        """Where ``name`` is served from, or None (one name: no listing)."""
        source = self._registered.get(name)
        return source if source is not None else self._roots.lookup(name)

    @property
    def dead(self) -> bool:
        """Whether the engine's process has exited (after ``shutdown`` too): nothing more can run."""
        return self._dead is not None

    def stats(self) -> dict:
        """The engine's stats after its latest step."""
        return dict(self._stats)

    # -- requests -----------------------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        adapter: str | dict[str, float] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """As ``AsyncLLM.generate``: the outputs as they arrive; an invalid request raises ``ValueError`` on
        the first iteration; closing the iterator early aborts the request."""
        if not self._accepting:
            raise RuntimeError("the engine is shutting down and accepts no new requests")
        sampling_params = sampling_params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if self._dead is not None:
                raise self._dead
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
            self._streams[request_id] = (stream, Unpacker())
        try:
            self._send(("add", request_id, prompt, sampling_params, adapter, time.time()))
            while not stream.finished:
                yield await stream.next()
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not stream.finished and self._dead is None:
                with contextlib.suppress(EngineDeadError):
                    self._send(("abort", request_id))

    async def abort(self, request_id: str) -> bool:
        """Stop a request; its stream ends with finish_reason "abort". False if the engine does not know it."""
        return await self._call("abort", request_id)

    async def load_adapter(
        self, name: str, path: str | Path, replace: bool = False, wait: bool = False
    ) -> None:
        """As ``AsyncLLM.load_adapter`` (read and validated by the engine's process; ``AdapterError`` here)."""
        await self._call("load_adapter", name, str(path), replace, wait)

    async def unload_adapter(self, name: str, wait: bool = False) -> None:
        """As ``AsyncLLM.unload_adapter``."""
        await self._call("unload_adapter", name, wait)

    async def reset_prefix_cache(self) -> bool:
        """As ``AsyncLLM.reset_prefix_cache``."""
        return await self._call("reset_prefix_cache")

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting requests, let running ones finish for up to ``drain_timeout`` s, abort the rest,
        then stop the engine process."""
        self._accepting = False
        if self._dead is None and not self._stopping:
            self._stopping = True
            with contextlib.suppress(EngineDeadError):
                await self._call("shutdown", drain_timeout)
        await asyncio.get_running_loop().run_in_executor(None, self._join)

    def close(self) -> None:
        """Synchronous stop (no event loop needed): aborts everything and waits for the process to exit."""
        self._accepting = False
        if self._dead is None and not self._stopping:
            self._stopping = True
            future = self._start_call("shutdown", 0.0)
            with contextlib.suppress(EngineDeadError, concurrent.futures.TimeoutError):
                future.result(timeout=STOP_TIMEOUT_S)
        self._join()

    # -- the pipe --------------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:  # the child is gone (or the pipe closed): the reader reports it
            with self._lock:
                dead = self._dead
            raise dead or EngineDeadError("the engine process is not running") from None

    def _start_call(self, name: str, *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._call_ids)
        with self._lock:
            if self._dead is not None:
                raise self._dead
            self._calls[call_id] = future
        self._send(("call", call_id, name, args))
        return future

    async def _call(self, name: str, *args: Any) -> Any:
        return await asyncio.wrap_future(self._start_call(name, *args))

    def _read(self) -> None:
        """The reader thread: hand each message from the child to its stream or call, until the pipe closes."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._handle(message)
            except Exception:  # a bug here must not stop the reader: every other stream would hang
                log.exception("handling a message from the engine process failed")
        self._lost()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "out":  # one engine step: [(request id, packed output)], stats
            self._stats = message[2]
            self._outputs(message[1])
        elif kind == "end":  # a request ended by an exception
            with self._lock:
                entry = self._streams.get(message[1])
            if entry is not None:
                _call_soon(entry[0].loop, _put_all, [(entry[0], _restore(message[2]))])
        elif kind == "reply":
            _, call_id, ok, value, registered = message
            self._registered = registered
            with self._lock:
                future = self._calls.pop(call_id, None)
            if future is not None and ok:
                future.set_result(value)
            elif future is not None:
                future.set_exception(_restore(value))

    def _outputs(self, batch: list[tuple[str, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        with self._lock:
            for request_id, packed in batch:
                entry = self._streams.get(request_id)
                if entry is not None:
                    stream, unpacker = entry
                    by_loop.setdefault(stream.loop, []).append((stream, unpacker.unpack(packed)))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def _lost(self) -> None:
        """The pipe closed: end every stream and call (expected after a shutdown, an error otherwise)."""
        self._process.join(timeout=STOP_TIMEOUT_S)
        if self._stopping:
            dead = EngineDeadError("the engine has been shut down")
        else:
            dead = EngineDeadError(
                f"the engine process exited unexpectedly (exit code {self._process.exitcode}); "
                "its log says why; restart the server"
            )
            log.error("%s", dead)
        with self._lock:
            self._dead = dead
            streams = list(self._streams.values())
            calls = list(self._calls.values())
            self._calls.clear()
        for stream, _ in streams:
            _call_soon(stream.loop, _put_all, [(stream, dead)])
        for future in calls:
            future.set_exception(dead)

    def _join(self) -> None:
        # the reader reaps the process once the pipe closes (one thread waits for it: two would race)
        self._reader.join(timeout=STOP_TIMEOUT_S)
        if self._reader.is_alive():
            log.warning("the engine process did not exit in %.0f s; killing it", STOP_TIMEOUT_S)
            self._process.kill()
            self._reader.join()


# -- the child ----------------------------------------------------------------------------------------------
def _core_main(conn: Any, kwargs: dict, threads: int | None, log_level: str) -> None:
    """The engine process: build the engine, report, then serve commands until shutdown or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent drains first
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        core = _Core(conn, **kwargs)
    except BaseException as exc:
        conn.send(("failed", _portable(exc)))
        return
    freeze_startup_heap()
    conn.send(("ready", core.describe()))
    asyncio.run(core.serve())


class _Core(AsyncLLM):
    """The child's ``AsyncLLM``: its engine thread sends each step's outputs down the pipe instead of to
    in-process streams; the main thread reads commands (``serve``)."""

    # a burst the server hands over together comes through the pipe and this loop's tasks one at a time: with
    # 2 ms of quiet, 128 requests the server sent within 5 ms still started with one (measured)
    admit_quiet_s = 0.005

    def __init__(self, conn: Any, **kwargs: Any) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()  # the engine thread (outputs) and the main thread (replies)
        self._packers: dict[str, Packer] = {}  # requests whose outputs the parent reads
        super().__init__(**kwargs)

    def describe(self) -> dict:
        return {
            "tokenizer": self.tokenizer,
            "limits": self.limits,
            "max_model_len": self.max_model_len,
            "stop_token_ids": self.structured_outputs.stop_token_ids,
            "roots": [str(root) for root in self.engine.store.registry.roots],
            "adapters": self._registered(),
            "stats": self.stats(),
        }

    def _registered(self) -> dict[str, str]:
        """Adapters registered by name (as ``Registry.list`` has them, without the roots' scan)."""
        return {e.name: e.source for e in self.engine.store.registry.entries() if not e.from_root}

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    # -- engine thread ----------------------------------------------------------------------------------
    def _hand_over(self, outputs: list[RequestOutput]) -> None:
        batch = []
        for out in outputs:
            packer = self._packers.get(out.request_id)
            if packer is None:
                continue  # aborted by the parent: nobody reads it
            if out.error is not None:  # it must cross the pipe (its message names its cause)
                out = dataclasses.replace(out, error=_picklable(out.error))
            batch.append((out.request_id, packer.pack(out)))
            if out.finished:
                self._packers.pop(out.request_id, None)
        try:
            self._send(("out", batch, self._stats))
        except OSError:
            pass  # the parent is gone: the main thread sees the pipe close and stops the engine
        except Exception as exc:  # an output that does not pickle: end those requests, not the engine
            log.exception("sending a step's outputs to the server failed")
            error = RuntimeError(f"the request's output could not be sent to the server: {exc!r}")
            for request_id, _ in batch:
                self._packers.pop(request_id, None)
                self.engine.abort_request(request_id, True)
                self._send(("end", request_id, _portable(error)))

    def _idle_stats(self) -> None:
        stats = self.engine.stats()
        if stats != self._stats:
            self._stats = stats
            self._send(("out", [], stats))

    def _deliver(self, request_id: str, item) -> None:
        if self._packers.pop(request_id, None) is not None:
            self._send(("end", request_id, _portable(item)))

    def _has_streams(self) -> bool:
        return bool(self._packers)

    # -- main thread -------------------------------------------------------------------------------------
    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future = loop.create_future()
        self._tasks: set[asyncio.Task] = set()
        loop.add_reader(self._conn.fileno(), self._readable)
        try:
            await self._done
        finally:
            loop.remove_reader(self._conn.fileno())
        if not self._stopped:  # the parent went away without a shutdown
            self.close()

    def _readable(self) -> None:
        try:
            while not self._done.done() and self._conn.poll():
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            if not self._done.done():
                self._done.set_result(None)

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            _, request_id, prompt, params, adapter, arrival = message
            self._packers[request_id] = Packer()
            self._spawn(self._add_checked(request_id, prompt, params, adapter, arrival))
        elif kind == "abort":
            if self._packers.pop(message[1], None) is not None:
                self._submit(self.engine.abort_request, message[1], True)
        elif kind == "call":
            _, call_id, name, args = message
            self._spawn(self._answer(call_id, name, args))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add_checked(self, request_id: str, prompt, params: SamplingParams, adapter, arrival) -> None:
        """Checked as ``AsyncLLM.generate`` checks a request (a grammar compile stays off the engine
        thread), then queued unless aborted meanwhile."""
        try:
            await self._check(params)
        except Exception as exc:
            self._deliver(request_id, exc)
            return
        if request_id in self._packers:  # not aborted meanwhile
            self._submit(self._add, request_id, prompt, params, adapter, arrival)

    async def _answer(self, call_id: int, name: str, args: tuple) -> None:
        try:
            if name not in CALLS:
                raise ValueError(f"unknown engine call {name!r}")
            result, ok = await getattr(self, name)(*args), True
        except Exception as exc:
            result, ok = _portable(exc), False
        self._send(("reply", call_id, ok, result, self._registered()))
        if name == "shutdown" and not self._done.done():
            self._done.set_result(None)


# -- exceptions across the pipe -----------------------------------------------------------------------------
def _picklable(exc: E) -> E | RuntimeError:
    """``exc`` if it pickles, else a ``RuntimeError`` with its type and text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _portable(exc: BaseException) -> tuple[BaseException, BaseException | None]:
    """``exc`` and its cause as they can cross the pipe (pickling drops ``__cause__``: ``_restore`` sets it)."""
    return _picklable(exc), None if exc.__cause__ is None else _picklable(exc.__cause__)


def _restore(portable: tuple[BaseException, BaseException | None]) -> BaseException:
    exc, cause = portable
    if cause is not None:
        exc.__cause__ = cause
    return exc
