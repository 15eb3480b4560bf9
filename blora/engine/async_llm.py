"""``AsyncLLM``: the engine loop in a background thread, requests as async iterators (what the server uses).

Only the engine thread touches the engine: requests, aborts and adapter loads are queued to it as commands
and run between steps; its outputs go back to each request's ``asyncio.Queue`` on the caller's event loop.
The model's forward releases the GIL, so the event loop stays responsive while the engine computes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from blora.engine.client import EngineLimits
from blora.engine.llm import build_engine
from blora.engine.llm_engine import EngineConfig, LLMEngine
from blora.engine.lora_request import LoRARequest, LoRARequestRegistry
from blora.engine.memory import release_free_memory
from blora.engine.outputs import RequestOutput
from blora.engine.sampling_params import SamplingParams
from blora.engine.structured import StructuredOutputs

log = logging.getLogger(__name__)

TRIM_INTERVAL_S = 1.0  # at most one heap trim per second, when the engine goes idle
# An idle engine that receives a request takes in the requests submitted right behind it before its first
# step: it steps once none has come for ADMIT_QUIET_S (at most ADMIT_MAX_S after the first). A burst the
# server hands over together (``blora.server.serving.Arrivals``) is submitted over a few event-loop turns;
# without the window the engine thread could start on the first few. A lone request pays ADMIT_QUIET_S.
ADMIT_QUIET_S = 0.002
ADMIT_MAX_S = 0.02


class _Stream:
    """One request's outputs on their way from the engine thread to its ``generate`` on the event loop.

    A deque and at most one waiting future instead of an ``asyncio.Queue``: a queue's ``put``/``get`` do
    bookkeeping (unfinished-task counts, getter and putter lists, a loop lookup) that a one-consumer
    unbounded channel does not need, on every streamed token.
    """

    __slots__ = ("loop", "items", "waiter", "finished")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque = deque()  # RequestOutput, or the exception that ends the stream
        self.waiter: asyncio.Future | None = None  # set while ``generate`` waits for an item
        self.finished = False  # its last output was taken, or the exception that ended it raised

    def put(self, item) -> None:
        """Append ``item`` and wake the waiting consumer (on the event loop)."""
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def next(self) -> RequestOutput:
        """The next output (waiting for it); raises the exception that ends the stream, or the output's
        ``error``."""
        while not self.items:
            self.waiter = waiter = self.loop.create_future()
            await waiter
        item = self.items.popleft()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        if item.error is not None:
            raise item.error
        return item


class AsyncLLM:
    """Continuous-batching engine for concurrent callers; the constructor takes ``LLM``'s arguments."""

    engine: LLMEngine  # built and assigned by the engine thread (``boot``) before ``__init__`` returns

    admit_quiet_s, admit_max_s = ADMIT_QUIET_S, ADMIT_MAX_S  # the admission window (see ``_admit``)

    def __init__(
        self,
        model=None,
        adapters: dict[str, str] | None = None,
        dtype=None,
        device=None,
        max_loras: int = EngineConfig.max_loras,
        max_num_seqs: int = EngineConfig.max_num_seqs,
        max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens,
        num_kv_blocks: int | None = None,
        block_size: int = EngineConfig.block_size,
        max_model_len: int | None = None,
        seed: int = EngineConfig.seed,
        tokenizer=None,
        **engine_config,
    ) -> None:
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._commands: deque[tuple[Callable, tuple, concurrent.futures.Future]] = deque()
        self._wakeup = threading.Event()
        self._accepting = True
        self._stopped = False
        self._lora_requests = LoRARequestRegistry()
        # Build the engine (load the model) in the thread that runs it. Every thread that runs parallel torch
        # ops keeps its own OpenMP team; with two teams on a machine with few cores, GNU OpenMP stops its
        # workers spinning between parallel regions and each op pays a wake-up (measured, bf16, 2 threads:
        # LLM.generate 630 tok/s in the thread that loaded the model, 460 in another thread). The caller
        # still gets construction errors.
        built: concurrent.futures.Future = concurrent.futures.Future()

        def boot() -> None:
            try:
                engine = build_engine(
                    model,
                    tokenizer=tokenizer,
                    adapters=adapters,
                    dtype=dtype,
                    device=device,
                    max_loras=max_loras,
                    max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens,
                    num_kv_blocks=num_kv_blocks,
                    block_size=block_size,
                    max_model_len=max_model_len,
                    seed=seed,
                    **engine_config,
                )
            except BaseException as exc:
                built.set_exception(exc)
                return
            self.engine = engine
            self._stats = engine.stats()
            built.set_result(engine)
            self._loop()

        self._thread = threading.Thread(target=boot, name="blora-engine", daemon=True)
        self._thread.start()
        built.result()

    # -- public API --------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits.of(self.engine)

    @property
    def structured_outputs(self) -> StructuredOutputs:
        """The engine's grammar compiler (a request checked with it finds its grammar in the cache)."""
        structured = self.engine.sampler.structured
        assert structured is not None  # LLMEngine configures its sampler when it is built
        return structured

    async def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        adapter: str | dict[str, float] | None = None,
        request_id: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output as tokens arrive; the last one has ``finished=True``. An invalid
        request raises ``ValueError`` on the first iteration (invalid sampling settings before anything
        is queued). If the request fails inside an engine step, the iteration raises
        ``RequestFailedError`` and the other requests keep running. Closing the iterator early aborts it.
        ``lora_request``: vLLM's ``LoRARequest(name, int_id, path)`` instead of ``adapter`` (loaded on
        first use)."""
        if not self._accepting:
            raise RuntimeError("AsyncLLM is shutting down and accepts no new requests")
        if lora_request is not None:
            adapter = await self._lora_adapter(lora_request, adapter)
        sampling_params = sampling_params or SamplingParams()
        await self._check(sampling_params)
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
            self._streams[request_id] = stream
        self._submit(self._add, request_id, prompt, sampling_params, adapter, time.time())
        try:
            while not stream.finished:
                yield await stream.next()
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not stream.finished:
                self._submit(self.engine.abort_request, request_id, True)

    async def _check(self, params: SamplingParams) -> None:
        """Refuse invalid settings before the request is queued, not in a step (``LLMEngine.check_params``
        is thread-safe): a grammar compile (up to its time bound) or tokenizing bad_words in a worker
        thread, the cheap checks here."""
        if params.structured_outputs is not None or params.bad_words:
            await asyncio.to_thread(self.engine.check_params, params)
        else:
            self.engine.check_params(params)

    async def _lora_adapter(self, req: LoRARequest, adapter) -> str:
        if adapter is not None:
            raise ValueError("pass adapter= or lora_request=, not both")
        if not isinstance(req, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(req).__name__}")
        if self._lora_requests.needs_load(req, self.adapter_source(req.lora_name)):
            try:
                await self.load_adapter(req.lora_name, req.path)
            except Exception:
                if self._lora_requests.needs_load(req, self.adapter_source(req.lora_name)):
                    raise
            self._lora_requests.loaded(req)  # (or a concurrent request loaded it first)
        return req.lora_name

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; its stream ends with finish_reason "abort"."""
        return await self._call(self.engine.abort_request, request_id)

    async def load_adapter(
        self, name: str, path: str | Path, replace: bool = False, wait: bool = False
    ) -> None:
        """Load (and validate) an adapter between engine steps; raises ``AdapterError`` if it is broken.
        ``replace=True`` swaps an existing one; while requests use it that is refused
        (``AdapterInUseError``) or, with ``wait=True``, awaited until they finish. The files are read and
        validated in a worker thread; the engine thread only installs the result."""
        prepared = await asyncio.to_thread(self.engine.store.prepare, name, path)
        future = await self._call(self.engine.load_adapter, name, path, replace, wait, prepared)
        if future is not None:
            await asyncio.wrap_future(future)

    async def unload_adapter(self, name: str, wait: bool = False) -> None:
        """Unload between steps; while requests use it: ``AdapterInUseError``, or with ``wait=True``
        return once they have finished (no request is lost either way)."""
        future = await self._call(self.engine.unload_adapter, name, wait)
        if future is not None:
            await asyncio.wrap_future(future)

    def list_adapters(self) -> dict[str, str]:
        """Registered adapters (name -> source). Read from the caller's thread while the engine thread may
        register adapters found under a root: a concurrent change is retried, never raised."""
        for _ in range(10):
            try:
                return dict(self.engine.adapter_paths)
            except RuntimeError:  # "dictionary changed size during iteration"
                time.sleep(0.001)
        return dict(self.engine.adapter_paths)

    def adapter_source(self, name: str) -> str | None:
        """Where the adapter ``name`` is served from, or None: one name looked up (no listing, no root
        scan), cheap enough for the event loop; safe while the engine thread registers adapters."""
        return self.engine.adapter_source(name)

    def stats(self) -> dict:
        """Snapshot taken by the engine thread after its latest step (see ``LLMEngine.stats``)."""
        return dict(self._stats)

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt block (in the engine thread); False, changing nothing, while requests
        hold blocks."""
        return await self._call(self.engine.reset_prefix_cache)

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting requests, let running ones finish for up to ``drain_timeout`` s, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self._has_streams() and time.monotonic() < deadline and not self._stopped:
            await asyncio.sleep(0.02)
        if not self._stopped:
            await self._call(self._abort_all)
            self._submit(self._stop)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def close(self) -> None:
        """Synchronous stop (for scripts without an event loop): aborts everything, joins the thread."""
        self._accepting = False
        if not self._stopped:
            self._submit(self._abort_all)
            self._submit(self._stop)
            self._thread.join()

    # -- engine thread -----------------------------------------------------------------------------
    def _submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.append((fn, args, future))
        self._wakeup.set()
        return future

    async def _call(self, fn: Callable, *args):
        if self._stopped:
            raise RuntimeError("AsyncLLM has been shut down")
        return await asyncio.wrap_future(self._submit(fn, *args))

    def _loop(self) -> None:
        busy, stepping, trimmed_at = False, False, -TRIM_INTERVAL_S  # busy: stepped since the last trim
        while not self._stopped:
            self._wakeup.clear()
            self._run_commands()
            if self._stopped:
                break
            if self.engine.has_unfinished_requests():
                if not stepping:
                    stepping = True
                    self._admit()
                    continue  # what came in meanwhile (a shutdown, aborts) is checked again first
                self._step()
                busy = True
            else:
                stepping = False
                self._idle_stats()
                if busy and time.monotonic() - trimmed_at >= TRIM_INTERVAL_S:
                    release_free_memory()  # idle now: RSS does not ratchet up to the largest step
                    busy, trimmed_at = False, time.monotonic()
                self._wakeup.wait()
        self._run_commands()  # answer late callers

    def _admit(self) -> None:
        """Idle -> busy: the requests submitted right behind the first join its first step."""
        deadline = time.monotonic() + self.admit_max_s
        while not self._stopped and self._wakeup.wait(self.admit_quiet_s) and time.monotonic() < deadline:
            self._wakeup.clear()
            self._run_commands()

    def _run_commands(self) -> None:
        while self._commands:
            fn, args, future = self._commands.popleft()
            try:
                future.set_result(fn(*args))
            except Exception as exc:
                future.set_exception(exc)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # outside any one request (LLMEngine.step isolates those): fail all
            log.exception("engine step failed; aborting all requests")
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id, True)
                self._deliver(request_id, exc)
            return
        self._stats = self.engine.stats()
        self._hand_over(outputs)

    def _hand_over(self, outputs: list[RequestOutput]) -> None:
        """Pass a step's outputs to their streams (each on its event loop)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def _idle_stats(self) -> None:
        """The stats snapshot once the engine has nothing to run (aborts and unloads change them too)."""
        self._stats = self.engine.stats()

    def _has_streams(self) -> bool:
        """Whether a request's outputs are still being read (a drain waits for none)."""
        return bool(self._streams)

    def _add(self, request_id, prompt, params, adapter, arrival_time) -> None:
        try:
            self.engine.add_request(request_id, prompt, params, adapter, arrival_time)
        except Exception as exc:
            self._deliver(request_id, exc)

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            _call_soon(stream.loop, _put_all, [(stream, item)])

    def _abort_all(self) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
        self._step()  # delivers the "abort" outputs

    def _stop(self) -> None:
        self._stopped = True


def _put_all(items: list[tuple[_Stream, object]]) -> None:
    for stream, item in items:
        stream.put(item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is listening
        loop.call_soon_threadsafe(fn, *args)
