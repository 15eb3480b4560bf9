"""The generation pipeline behind ``/v1/completions`` and ``/v1/chat/completions``.

request -> model name to adapter -> size bounds -> prompt token ids (chat template for chat) -> length
check -> SamplingParams -> admission (429/503) -> one engine request per prompt (``n`` choices each) ->
JSON response or SSE stream. Cleanup (abort of unfinished engine requests, release of the admission
ticket and its adapter pins) runs however the request ends: success, error, client disconnect, or drain.

Nothing slow runs on the event loop: prompts are bounded in characters before they are tokenized (a prompt
longer than the context can hold tokens of the longest vocabulary entry cannot fit), and tokenization and
chat templating of all but short inputs run in a small thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from starlette.responses import Response

from blora.engine import SamplingParams
from blora.engine.client import EngineClient
from blora.engine.sampling_params import SamplingParamError
from blora.engine.validation import ContextLengthError, check_prompt_ids, check_token_ids, resolve_max_tokens
from blora.server.adapters import AdapterManager
from blora.server.errors import APIError, InvalidRequestError, sse_error
from blora.server.lifecycle import Lifecycle, Ticket, abort_quietly
from blora.server.metrics import RequestTimer, ServerMetrics
from blora.server.protocol import SamplingFields, UsageInfo
from blora.server.render import StreamState, usage_of

logger = logging.getLogger("blora.server")

MAX_CHOICES = 256  # prompts x n in one request
SUBMIT_TURNS = 3  # event-loop turns a streaming request gives the engine to accept or reject it
INLINE_CHARS = 2048  # inputs up to this size are tokenized inline: cheaper than a thread hop (~1 ms)
PREP_WORKERS = 2  # threads for tokenization and chat templating (bounded: a flood of big prompts queues)
MIN_CHARS_PER_TOKEN, MAX_CHARS_PER_TOKEN = 16, 256  # clamp of the longest vocabulary entry

T = TypeVar("T")

# The client's X-Request-Id for the request being handled (set by the app's middleware), or None.
REQUEST_ID: ContextVar[str | None] = ContextVar("blora_request_id", default=None)
# The generation request being handled: marks it ready for the engine (``Arrivals``; set by the middleware).
ARRIVAL: ContextVar[Callable[[], None] | None] = ContextVar("blora_arrival", default=None)
GATHER_MAX_S = 0.1  # how long the first request of a burst waits for the rest (``Arrivals``)
GATHER_TURNS = 3  # event-loop turns it first gives the requests already received


class Arrivals:
    """Generation requests between the server's front door and their hand-over to the engine.

    Clients that start together reach the engine one at a time, as fast as the server parses them (~0.5 ms
    each), and an idle engine would start its first step with the first arrival alone: measured at 32 and 128
    streams, the rest were parsed, more slowly, while that step ran (its threads take every core; in one
    process it also holds the GIL) and waited for it, 50-500 ms of their time to first token. So when no
    request is in flight, a request that is ready waits (at most ``GATHER_MAX_S``) until the requests that
    came in behind it are ready too, and they go to the engine together. A lone request waits for nothing.
    """

    def __init__(self) -> None:
        self.pending = 0  # entered, not yet ready (or ended)
        self._waiters: list[asyncio.Future] = []

    def enter(self) -> Callable[[], None]:
        """Count a request in; returns its ``ready`` (idempotent: the request is ready or has ended)."""
        self.pending += 1
        done = False

        def ready() -> None:
            nonlocal done
            if not done:
                done = True
                self.pending -= 1
                if not self.pending:
                    waiters, self._waiters = self._waiters, []
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)

        return ready

    async def gather(self, timeout: float) -> None:
        """Wait until no request is pending (or ``timeout`` seconds). First, and after each wait, a few event-loop
        turns let the requests already received reach the front door: the first of a burst gets here before
        the server has read the others (one loop turn each), and a lone request pays only those turns."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for _ in range(GATHER_TURNS):
                await asyncio.sleep(0)
            remaining = deadline - loop.time()
            if not self.pending or remaining <= 0:
                return
            waiter = loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, remaining)


def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry (clamped): no token decodes to more characters.

    Byte-level BPE and SentencePiece vocabularies spell a token with at least as many characters as it
    decodes to, so a text longer than ``max_model_len`` times this has more than ``max_model_len`` tokens.
    """
    try:
        longest = max(map(len, tokenizer.get_vocab()))
    except Exception:  # a tokenizer without a vocabulary listing: the generous upper clamp
        longest = MAX_CHARS_PER_TOKEN
    return min(max(longest, MIN_CHARS_PER_TOKEN), MAX_CHARS_PER_TOKEN)


def adapter_names(adapter: str | dict[str, float] | None) -> tuple[str, ...]:
    """The adapters a resolved ``model`` / ``adapter_mixture`` uses."""
    if adapter is None:
        return ()
    return (adapter,) if isinstance(adapter, str) else tuple(adapter)


@dataclass
class Job:
    """One engine request: one prompt with its ``n`` choices."""

    index: int
    request_id: str
    prompt_ids: list[int]
    prompt_text: str | None
    stream: AsyncIterator[Any]
    timer: RequestTimer
    first: asyncio.Future | None = None  # the pending or done first engine output
    final: Any = None
    tokens_seen: int = 0

    def observe(self, out: Any) -> None:
        """Latency metrics for one engine output; remembers the final one."""
        new = 0
        for c in out.outputs:  # a loop, not sum() over a generator: this runs for every streamed token
            new += len(c.delta_token_ids)
        if new:
            self.tokens_seen += new
            self.timer.on_tokens(new)
        if out.finished:
            self.final = out
            outputs = [(len(c.token_ids), c.finish_reason) for c in out.outputs]
            self.timer.on_finish(len(self.prompt_ids), outputs, getattr(out, "metrics", None))

    async def outputs(self) -> AsyncIterator[Any]:
        """Every engine output of this job, starting with the first one (submitted by ``start``)."""
        if self.first is not None:
            out = await self.first
            self.observe(out)
            yield out
            if out.finished:
                return
        async for out in self.stream:
            self.observe(out)
            yield out


@dataclass
class Generation:
    """An admitted request with its running jobs; ``cleanup()`` is idempotent."""

    request_id: str
    jobs: list[Job]
    ticket: Ticket
    engine: EngineClient
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage so far in every chunk

    def usage_so_far(self) -> UsageInfo:
        """Usage of the tokens streamed so far (vLLM's continuous usage stats); a prompt counts once."""
        prompt = sum(len(job.prompt_ids) for job in self.jobs)
        completion = sum(job.tokens_seen for job in self.jobs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def with_usage(self, chunk: str) -> str:
        """``chunk`` (an SSE ``data:`` line of one JSON object) with ``usage`` set to the usage so far."""
        if not self.continuous_usage or not chunk.startswith("data: {"):
            return chunk
        payload = json.loads(chunk[len("data: ") :])
        payload["usage"] = self.usage_so_far().model_dump()
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def encode(self, chunks: list[str]) -> bytes:
        """``chunks`` (SSE lines) as the bytes of one write, each with the usage so far if asked for."""
        if self.continuous_usage:
            chunks = [self.with_usage(chunk) for chunk in chunks]
        return "".join(chunks).encode()

    async def cleanup(self) -> None:
        for job in self.jobs:
            if job.final is None:
                if job.first is not None and not job.first.done():
                    job.first.cancel()
                await abort_quietly(self.engine, job.request_id)
                await close_quietly(job.stream)
        self.ticket.release()


async def close_quietly(stream: Any) -> None:
    with anyio.CancelScope(shield=True):
        # the stream may still be running in a cancelled task, or already be closed
        with contextlib.suppress(Exception):
            await stream.aclose()


class SendFailed(BaseException):
    """``send`` raised while ``SSEResponse`` wrote a body piece: carries ``error`` (re-raised by the response)
    past a producer's ``except Exception``."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


Write = Callable[[bytes], Awaitable[None]]  # writes one piece of a response body


class SSEResponse(Response):
    """A ``text/event-stream`` response whose ``produce(write)`` writes the body, then ``cleanup`` runs
    however it ends (client disconnects included).

    Hand-written instead of Starlette's ``StreamingResponse`` for the event-loop CPU per streamed token, which
    is engine throughput lost where both share the cores: ``produce`` writes bytes with ``write(data)`` (one
    ``http.response.body`` message each), with no async generator between it and ``send``, and it runs in
    a task of its own, whose short stack is all that resumes for each token (the request's task sits under
    a dozen ASGI middleware frames, all of which a resume there passes through). A listener task cancels
    the writer when the client disconnects; the request's task waits for the writer, then cleans up.
    """

    media_type = "text/event-stream"

    def __init__(self, produce: Callable[[Write], Awaitable[None]], cleanup: Callable[[], Any]) -> None:
        self.status_code = 200
        self.background = None
        self._produce = produce
        self._cleanup = cleanup
        self.init_headers()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def write(data: bytes) -> None:
            try:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            except Exception as exc:  # past produce's handlers, which are for the engine and rendering
                raise SendFailed(exc) from exc

        async def respond() -> None:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send(start)
            await self._produce(write)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            writer.cancel()  # a no-op once the response is complete

        writer = asyncio.create_task(respond())
        listener = asyncio.create_task(listen())
        try:
            await asyncio.wait([writer])
            if not writer.cancelled():  # cancelled: the client went away, the response ends here
                error = writer.exception()
                if error is not None:
                    raise error.error if isinstance(error, SendFailed) else error
        finally:
            listener.cancel()
            with anyio.CancelScope(shield=True):
                if not writer.done():  # this task was cancelled (server shutdown): stop writing first
                    writer.cancel()
                    await asyncio.wait([writer])
                await self._cleanup()
        if self.background is not None:
            await self.background()


async def merge(jobs: list[Job]) -> AsyncIterator[tuple[Job, Any]]:
    """Interleave the outputs of several jobs as they arrive."""
    if len(jobs) == 1:
        async for out in jobs[0].outputs():
            yield jobs[0], out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(job: Job) -> None:
        try:
            async for out in job.outputs():
                await queue.put((job, out))
        except Exception as exc:
            await queue.put((job, exc))
        finally:
            await queue.put((job, done))

    tasks = [asyncio.create_task(pump(job)) for job in jobs]
    try:
        remaining = len(jobs)
        while remaining:
            job, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield job, item
    finally:
        for t in tasks:
            t.cancel()


class Serving:
    """Shared pipeline of both generation endpoints."""

    def __init__(
        self,
        engine: EngineClient,
        adapters: AdapterManager,
        metrics: ServerMetrics,
        lifecycle: Lifecycle,
        max_prompt_chars: int | None = None,
    ) -> None:
        self.engine = engine
        self.adapters = adapters
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.tokenizer = engine.tokenizer
        self.max_prompt_chars = max_prompt_chars  # None: derived from the context (prompt_char_limit)
        self.chars_per_token = longest_token_chars(self.tokenizer)
        self._prep = ThreadPoolExecutor(PREP_WORKERS, thread_name_prefix="blora-prep")
        self.sampling_defaults: dict[str, Any] = {}  # for fields a request leaves unset (--generation-config)
        self.arrivals = Arrivals()
        self.log_requests = False

    def close(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)

    # -- request preparation -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt, tokenized as the engine tokenizes string prompts."""
        return list(self.tokenizer.encode(text))

    def max_model_len(self) -> int:
        return self.engine.limits.max_model_len

    def prompt_char_limit(self) -> int | None:
        """The most characters a prompt (or a chat's messages) may have before it is tokenized."""
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        limit = self.max_model_len()
        return None if limit is None else limit * self.chars_per_token

    def check_chars(self, chars: int, param: str) -> None:
        """400 for an input too long to fit, before any tokenization or templating work."""
        limit = self.prompt_char_limit()
        if limit is None or chars <= limit:
            return
        if self.max_prompt_chars is not None:
            why = f"the server's limit is {limit:,} characters (--max-prompt-chars)"
        else:
            why = (
                f"this model's maximum context length of {self.max_model_len():,} tokens holds at most "
                f"{limit:,} characters"
            )
        raise InvalidRequestError(
            f"The {param} has {chars:,} characters; {why}. Please reduce the {param}.",
            param=param,
            code="context_length_exceeded",
        )

    @staticmethod
    def check_choices(prompts: int, n: int) -> None:
        if prompts * n > MAX_CHOICES:
            raise InvalidRequestError(
                f"The request asks for {prompts * n} completions (prompts x n); the limit is {MAX_CHOICES}",
                param="n",
            )

    async def off_loop(self, chars: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the preparation thread pool, or inline for inputs of at most ``INLINE_CHARS``."""
        if chars <= INLINE_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    async def prompt_ids(self, prompts: list[str | list[int]]) -> list[tuple[list[int], str | None]]:
        """(token ids, text or None) of each completion prompt: bounded, then tokenized off the loop."""
        texts = [p for p in prompts if isinstance(p, str)]
        for text in texts:
            self.check_chars(len(text), "prompt")
        for ids in prompts:
            if not isinstance(ids, str):
                self.check_token_ids(ids)
        chars = sum(map(len, texts))
        encoded = iter(await self.off_loop(chars, lambda: [self.encode(t) for t in texts]))
        return [(next(encoded), p) if isinstance(p, str) else (list(p), None) for p in prompts]

    def check_token_ids(self, ids: list[int]) -> None:
        """400 for prompt token ids the engine would refuse (``blora.engine.validation``'s rules)."""
        if len(ids) > self.max_model_len():
            self.check_length(ids, 1)  # the context-length error
        try:
            check_token_ids("prompt", ids, self.engine.limits.vocab_size, "prompt token ids")
        except SamplingParamError as exc:
            raise InvalidRequestError(str(exc), param=exc.param) from None

    def resolve(self, req: SamplingFields) -> str | dict[str, float] | None:
        """The adapter (name, mixture or None) of ``req``; 404 for unknown or unloading adapters."""
        if req.adapter_mixture is not None:
            adapter: str | dict[str, float] | None = self.adapters.resolve_mixture(
                req.model, req.adapter_mixture
            )
        else:
            adapter = self.adapters.resolve(req.model)
        self.lifecycle.pins.check(req.model, adapter_names(adapter))
        return adapter

    def check_length(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        """The effective max_tokens for a prompt; 400 if it is empty or prompt + max_tokens exceed the
        context (``blora.engine.validation``'s rules, the engine's)."""
        limits = self.engine.limits
        default = self.sampling_defaults.get("max_tokens")
        try:
            check_prompt_ids(prompt_ids, limits.vocab_size)
            return resolve_max_tokens(len(prompt_ids), max_tokens, limits.max_model_len, default)
        except ContextLengthError as exc:
            raise InvalidRequestError(str(exc), param=exc.param, code=exc.code) from None
        except SamplingParamError as exc:
            raise InvalidRequestError(str(exc), param=exc.param) from None

    def sampling_params(self, req: SamplingFields, max_tokens: int, logprobs: int | None) -> Any:
        default = self._default
        kwargs = dict(
            n=req.n,
            max_tokens=max_tokens,
            temperature=default(req.temperature, "temperature", 1.0),
            top_p=default(req.top_p, "top_p", 1.0),
            top_k=default(req.top_k, "top_k", 0) or 0,
            min_p=default(req.min_p, "min_p", 0.0) or 0.0,
            repetition_penalty=default(req.repetition_penalty, "repetition_penalty", 1.0) or 1.0,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=req.seed,
            stop=req.stop_list(),
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
        )
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"Invalid sampling parameters: {exc}") from exc

    def _default(self, value: Any, name: str, fallback: Any) -> Any:
        """The request's value, else the server's default for ``name`` (``sampling_defaults``), else ``fallback``."""
        if value is not None:
            return value
        return self.sampling_defaults.get(name, fallback)

    def new_request_id(self, prefix: str) -> str:
        """``prefix-<X-Request-Id>`` when the client sent one (made unique if it is in use), else a uuid."""
        given = REQUEST_ID.get()
        if given is None:
            return f"{prefix}-{uuid.uuid4().hex}"
        request_id = f"{prefix}-{given}"
        if request_id in self.lifecycle.tickets:
            request_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        return request_id

    # -- running ----------------------------------------------------------------------------------

    async def start(
        self,
        prefix: str,
        req: SamplingFields,
        prompts: list[tuple[list[int], str | None]],
        params: list[Any],
        wait_first: bool,
    ) -> Generation:
        """Admit the request and submit one engine request per prompt (the first of a burst at an idle engine
        waits for the rest first: ``Arrivals``).

        Submission errors the engine raises (``ValueError``) become a 400 here. Non-streaming requests wait
        for the first outputs; streaming ones only let the submissions run (a few event-loop turns), so
        that a request queued behind a full batch still gets its response headers at once.

        The adapter is resolved and pinned (by the admission ticket) in one event-loop turn, so it cannot
        be unloaded before the engine has the request: an unload in between gets 400 (in use), a request
        during an unload gets 404.
        """
        ready = ARRIVAL.get()
        if ready is not None:
            ready()
            if not self.lifecycle.in_flight:  # an idle engine: the burst this one may lead goes in together
                await self.arrivals.gather(GATHER_MAX_S)
        adapter = self.resolve(req)
        self.check_choices(len(prompts), params[0].n if params else 1)
        request_id = self.new_request_id(prefix)
        try:
            ticket = self.lifecycle.admit(request_id, adapter_names(adapter))
        except APIError as exc:
            self.metrics.reject(exc.code or exc.error_type)
            raise
        if self.log_requests:
            logger.info(
                "request %s: model %r, %d prompt(s) of %s tokens, n=%d, max_tokens=%s",
                request_id, req.model, len(prompts), [len(ids) for ids, _ in prompts],
                params[0].n if params else 1, params[0].max_tokens if params else None,
            )  # fmt: skip
        arrival = time.monotonic()
        jobs, firsts = [], []
        for i, ((ids, text), sp) in enumerate(zip(prompts, params, strict=True)):
            rid = f"{request_id}-{i}"
            ticket.engine_ids.append(rid)
            stream = self.engine.generate(ids, sp, adapter=adapter, request_id=rid)
            job = Job(i, rid, ids, text, stream, RequestTimer(self.metrics, arrival))
            job.timer.on_params(sp.n, sp.max_tokens)
            job.first = first = asyncio.ensure_future(anext(stream))
            jobs.append(job)
            firsts.append(first)
        options = getattr(req, "stream_options", None)
        continuous = bool(
            options and options.include_usage and getattr(options, "continuous_usage_stats", False)
        )
        gen = Generation(request_id, jobs, ticket, self.engine, continuous)
        try:
            if wait_first:
                await asyncio.wait(firsts)
            else:
                for _ in range(SUBMIT_TURNS):
                    await asyncio.sleep(0)
            for first in firsts:
                error = first.exception() if first.done() else None
                if error is not None:
                    raise error
        except ValueError as exc:
            await gen.cleanup()
            self.metrics.reject("invalid_request")
            raise InvalidRequestError(str(exc), param=getattr(exc, "param", None)) from exc
        except BaseException:
            await gen.cleanup()
            raise
        return gen

    async def collect(self, gen: Generation) -> list[Any]:
        """Run every job to completion; the final engine output of each prompt."""
        try:
            async for _job, _out in merge(gen.jobs):
                pass
            return [job.final for job in gen.jobs]
        finally:
            await gen.cleanup()

    def stream(
        self,
        gen: Generation,
        n: int,
        render: Callable[[Job, StreamState, Any], list[str]],
        opening: list[str],
        usage_chunk: Callable[[UsageInfo], str] | None,
    ) -> SSEResponse:
        """An SSE response: ``opening`` chunks, rendered deltas, optional usage chunk, ``[DONE]``.

        The chunks rendered from one engine output go out in one write, as do the closing ones (usage and
        ``[DONE]``): the same bytes in fewer HTTP chunks, none held back waiting for another output. A
        single engine request (one prompt, any ``n``) is read from ``Job.outputs``, without ``merge``.
        """

        async def produce(write: Write) -> None:
            state = StreamState(n)
            tail: list[str] = []
            try:
                if opening:
                    await write(gen.encode(opening))
                if len(gen.jobs) == 1:
                    job = gen.jobs[0]
                    async for out in job.outputs():
                        if chunks := render(job, state, out):
                            await write(gen.encode(chunks))
                else:
                    async for job, out in merge(gen.jobs):
                        if chunks := render(job, state, out):
                            await write(gen.encode(chunks))
                if usage_chunk is not None:
                    tail.append(usage_chunk(usage_of([job.final for job in gen.jobs if job.final])))
            except APIError as exc:
                tail.append(sse_error(exc))
            except ValueError as exc:  # the engine refused the request after the stream started
                tail.append(sse_error(InvalidRequestError(str(exc), param=getattr(exc, "param", None))))
            except Exception as exc:
                logger.exception("stream %s failed", gen.request_id)
                tail.append(sse_error(APIError(f"Generation failed: {type(exc).__name__}: {exc}")))
            tail.append("data: [DONE]\n\n")
            await write("".join(tail).encode())  # as they are: continuous usage is for the deltas

        return SSEResponse(produce, gen.cleanup)
