"""The FastAPI application: ``create_app(engine, config)``.

The engine is injected: any ``EngineClient`` (``blora.engine.AsyncLLM`` in one process, ``ClusterEngine``
on Ray), so the HTTP layer can also be exercised on its own. Routes:

- ``GET /v1/models``, ``GET /v1/models/{id}``: the base model and its adapters
- ``POST /v1/completions``, ``POST /v1/chat/completions``: streaming (SSE) and not
- ``POST /v1/load_lora_adapter`` (``load_inplace`` replaces), ``POST /v1/unload_lora_adapter``: with
  ``allow_runtime_adapters``, which also serves an unknown ``model`` by loading that adapter from the root
- ``POST /tokenize``, ``POST /detokenize`` (vLLM's shapes)
- ``GET /health`` and ``GET|POST /ping`` (503 while draining), ``GET /metrics`` (Prometheus)

Every response carries the request's ``X-Request-Id`` header back (generation requests also use it in their
id); with ``allowed_origins`` CORS headers are added; ``root_path`` serves behind a path-stripping proxy.
- ``GET /docs``, ``GET /redoc``, ``GET /openapi.json``: behind the API key when one is set; removed with
  ``disable_docs``
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from blora.engine.client import EngineClient
from blora.engine.llm_engine import EngineConfig
from blora.server.adapters import AdapterManager
from blora.server.completions import create_chat_completion, create_completion
from blora.server.errors import (
    APIError,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ShuttingDownError,
    clip,
    install_error_handlers,
)
from blora.server.lifecycle import Lifecycle
from blora.server.metrics import ServerMetrics
from blora.server.playground import router as playground_router
from blora.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    ModelList,
    UnloadLoRAAdapterRequest,
)
from blora.server.serving import ARRIVAL, REQUEST_ID, Arrivals, Serving
from blora.server.tokenization import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    detokenize,
    tokenize,
)

logger = logging.getLogger("blora.server")

MAX_BODY_BYTES = 32 << 20
MAX_DRAIN_BYTES = 64 << 20  # of an oversized body, read and dropped before the 413 (so clients see it)
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")  # counted by Arrivals until submitted
TOKENIZER_PATHS = ("/tokenize", "/detokenize")  # behind the API key like /v1 (they cost tokenizer time)


@dataclass
class ServerConfig:
    """Server settings (the engine's own settings live on the engine)."""

    served_model_name: str
    model_source: str = ""
    api_key: str | None = None
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_queue: int | None = 256  # waiting requests beyond max_num_seqs; None = unbounded
    max_loras: int | None = None
    adapter_root: Path | None = None
    allow_runtime_adapters: bool = False
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0
    shutdown_engine: bool = True  # call engine.shutdown() when the app's lifespan ends
    disable_docs: bool = False  # remove /docs, /redoc and /openapi.json
    max_body_bytes: int = MAX_BODY_BYTES
    max_prompt_chars: int | None = None  # None: max_model_len x the longest vocabulary entry
    served_model_aliases: tuple[
        str, ...
    ] = ()  # more names of the base model (vLLM's --served-model-name A B)
    metric_names: str = "both"  # /metrics prefixes: "both" (vllm: and blora:), "vllm" or "blora"
    log_requests: bool = False  # one INFO line per generation request
    sampling_defaults: dict[str, Any] = field(
        default_factory=dict
    )  # request fields left unset (--generation-config)
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    root_path: str = ""
    adapter_parents: dict[str, str] = field(
        default_factory=dict
    )  # model card parent (vLLM's base_model_name)


class GateMiddleware:
    """Pure ASGI gate in front of every route: 503 while draining, 401 without the API key, 413 for
    bodies over ``max_body_bytes``.

    The key is checked before the body is read, so refused requests never cost a JSON parse. The body
    is then read here, counting the bytes actually received (a chunked body has no Content-Length, and a
    Content-Length can be wrong), and handed to the app only when it is within the limit. ``/metrics``
    stays open (monitoring must see a draining server); ``/health`` is open but reports 503 while
    draining; the API docs need the key when one is set. A generation request it lets through is counted in
    ``arrivals`` until the request is ready for the engine or ends (``Arrivals``).
    """

    def __init__(
        self,
        app: Any,
        lifecycle: Lifecycle,
        api_key: str | None,
        metrics: ServerMetrics,
        arrivals: Arrivals,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.arrivals = arrivals
        self.api_key = api_key
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self._refusal(scope)
        if error is None:
            messages, too_large = await self._read_body(receive)
            if too_large:
                error = self._too_large()
            else:
                receive = _replay(messages, receive)
        if error is not None:
            return await error.to_response()(scope, receive, send)
        if not scope.get("path", "").endswith(GENERATION_PATHS):
            return await self.app(scope, receive, send)
        ready = self.arrivals.enter()  # pending until Serving.start takes it (or it ends)
        token = ARRIVAL.set(ready)
        try:
            return await self.app(scope, receive, send)
        finally:
            ready()
            ARRIVAL.reset(token)

    def _refusal(self, scope: dict) -> APIError | None:
        path: str = scope.get("path", "")
        if self.lifecycle.draining and path != "/metrics":
            self.metrics.reject("shutting_down")
            return ShuttingDownError("The server is shutting down and does not accept new requests")
        protected = path.startswith("/v1") or path in DOCS_PATHS or path in TOKENIZER_PATHS
        if self.api_key and protected and not self._authorized(scope):
            return AuthenticationError("Incorrect or missing API key; send 'Authorization: Bearer <key>'")
        if _content_length(scope) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"The request body is over {self.max_body_bytes:,} bytes")

    async def _read_body(self, receive: Any) -> tuple[list[dict], bool]:
        """The request's messages up to the end of its body, or (dropped, True) once it is too large.

        Of a too-large body up to ``MAX_DRAIN_BYTES`` more are read and dropped, so that a client still
        sending gets the 413 rather than a reset connection.
        """
        messages: list[dict] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, False  # a disconnect: the app sees it
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                break
            if not message.get("more_body", False):
                return messages, False
        messages.clear()
        while message.get("more_body", False) and size <= self.max_body_bytes + MAX_DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
        return [], True

    def _authorized(self, scope: dict) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        assert self.api_key is not None
        given, expected = token.strip().encode("latin-1"), self.api_key.encode()
        return scheme.lower() == "bearer" and secrets.compare_digest(given, expected)


MAX_REQUEST_ID_CHARS = 256


class RequestIdMiddleware:
    """Honour ``X-Request-Id``: generation requests take it into their id (``REQUEST_ID``) and every response
    sends it back. Ids longer than ``MAX_REQUEST_ID_CHARS`` or with non-printable characters get a 400."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = next((v for k, v in scope.get("headers") or [] if k == b"x-request-id"), None)
        if raw is None:
            return await self.app(scope, receive, send)
        value = raw.decode("latin-1")
        if len(value) > MAX_REQUEST_ID_CHARS or not value.isprintable() or not value.strip():
            error = InvalidRequestError(
                f"The X-Request-Id header must be 1 to {MAX_REQUEST_ID_CHARS} printable characters",
                param="X-Request-Id",
            )
            return await error.to_response()(scope, receive, send)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", raw)]}
            await send(message)

        token = REQUEST_ID.set(value)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


def _replay(messages: list[dict], receive: Any) -> Any:
    """A ``receive`` that returns the already-read ``messages`` first, then the connection's own."""
    pending = list(messages)

    async def replay() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def _content_length(scope: dict) -> int:
    for key, value in scope.get("headers") or []:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def _listen_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def with_cancellation(handler: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Awaitable[Any]]:
    """Cancel the handler (and so abort its engine requests) if the client disconnects while it runs.

    Streaming responses are covered here until their first output; after that the SSE response
    (``serving.SSEResponse``) stops writing on disconnect and its cleanup aborts the engine requests.
    """

    @functools.wraps(handler)
    async def wrapper(body: Any, raw_request: Request) -> Any:
        task = asyncio.create_task(handler(body, raw_request))
        watcher = asyncio.create_task(_listen_for_disconnect(raw_request))
        try:
            done, _ = await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if task in done:
            return task.result()
        task.cancel()
        logger.info("client disconnected from %s before the response started", raw_request.url.path)
        return Response(status_code=499)

    return wrapper


def create_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    """The OpenAI-compatible app around ``engine``."""
    limits = engine.limits
    max_loras = config.max_loras if config.max_loras is not None else limits.max_loras
    metrics = ServerMetrics(
        engine, config.served_model_name, max_loras, config.metric_names, limits.max_model_len
    )
    capacity = None if config.max_queue is None else config.max_num_seqs + config.max_queue
    lifecycle = Lifecycle(
        capacity, config.retry_after_s, on_change=metrics.in_flight.labels(config.served_model_name).set
    )
    adapters = AdapterManager(
        engine,
        config.served_model_name,
        config.model_source,
        config.adapter_root,
        config.allow_runtime_adapters,
        config.served_model_aliases,
        config.adapter_parents,
    )
    serving = Serving(engine, adapters, metrics, lifecycle, config.max_prompt_chars)
    serving.sampling_defaults = dict(config.sampling_defaults)
    serving.log_requests = config.log_requests

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        lifecycle.draining = True
        serving.close()
        if config.shutdown_engine:
            await engine.shutdown(drain_timeout=1.0)  # the server drained already

    docs: dict[str, Any] = (
        dict(docs_url=None, redoc_url=None, openapi_url=None) if config.disable_docs else {}
    )
    app = FastAPI(title="blora", lifespan=lifespan, root_path=config.root_path, **docs)
    app.state.engine, app.state.config, app.state.lifecycle = engine, config, lifecycle
    app.state.metrics, app.state.adapters, app.state.serving = metrics, adapters, serving
    install_error_handlers(app)
    app.add_middleware(
        GateMiddleware,
        lifecycle=lifecycle,
        api_key=config.api_key,
        metrics=metrics,
        arrivals=serving.arrivals,
        max_body_bytes=config.max_body_bytes,
    )
    app.add_middleware(RequestIdMiddleware)  # outermost but CORS: refusals carry the id too
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=list(config.allowed_methods),
            allow_headers=list(config.allowed_headers),
            allow_credentials=config.allow_credentials,
            expose_headers=["X-Request-Id"],
        )
    metrics.draining.labels(config.served_model_name).set_function(lambda: float(lifecycle.draining))

    @app.get("/health")
    async def health() -> Response:
        """200, or 503 once the engine can run nothing more (its process died: restart the server)."""
        return Response(status_code=503 if getattr(engine, "dead", False) else 200)

    @app.get("/ping")
    @app.post("/ping")
    async def ping() -> Response:
        """SageMaker-style liveness (vLLM's): 200, or 503 while draining (answered by the gate)."""
        return Response(status_code=200)

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeChatRequest | TokenizeCompletionRequest) -> TokenizeResponse:
        return await tokenize(serving, body)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        return await detokenize(serving, body)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=adapters.cards())

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Any:
        for card in adapters.cards():
            if card.id == model_id:
                return card
        raise NotFoundError(f"The model {clip(model_id)!r} does not exist", param="model")

    @app.post("/v1/completions")
    @with_cancellation
    async def completions(body: CompletionRequest, raw_request: Request) -> Any:
        await adapters.autoload(body.model, body.adapter_mixture)
        return await create_completion(serving, body)

    @app.post("/v1/chat/completions")
    @with_cancellation
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request) -> Any:
        await adapters.autoload(body.model, body.adapter_mixture)
        return await create_chat_completion(serving, body)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        try:
            message = await adapters.load(body.lora_name, body.lora_path, replace=body.load_inplace)
        except Exception:
            metrics.adapter_loads.labels(config.served_model_name, "failure").inc()
            raise
        metrics.adapter_loads.labels(config.served_model_name, "success").inc()
        return PlainTextResponse(message)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        if not (config.allow_runtime_adapters and config.adapter_root is not None):
            return PlainTextResponse(await adapters.unload(body.lora_name))  # 404: disabled
        # 400 while requests in flight use it; meanwhile new requests for it get 404 (see AdapterPins)
        with lifecycle.pins.unloading_of(body.lora_name):
            return PlainTextResponse(await adapters.unload(body.lora_name))

    @app.get("/version")
    async def version() -> JSONResponse:
        from importlib.metadata import version as pkg_version

        return JSONResponse({"version": pkg_version("blora")})

    app.include_router(playground_router)  # GET /: the playground page
    return app
