"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

| status | when | type / code |
|---|---|---|
| 400 | invalid parameters, malformed JSON, prompt + max_tokens beyond the context | invalid_request_error |
| 401 | missing or wrong API key | invalid_request_error / invalid_api_key |
| 404 | unknown model or adapter, adapter path that does not exist | invalid_request_error / model_not_found |
| 413 | request body over the limit (32 MiB; bytes received, chunked too) | invalid_request_error / body_too_large |
| 429 | the bounded request queue is full (with ``Retry-After``) | rate_limit_error / queue_full |
| 503 | the server is draining for shutdown | server_error / shutting_down |
| 503 | the engine's process has died (restart the server) | server_error / engine_dead |
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from blora.engine.process import EngineDeadError
from blora.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("blora.server")

MAX_ECHO_CHARS = 100  # client-supplied names quoted in an error message are cut to this
MAX_MESSAGE_CHARS = 4096  # and no error message is longer than this


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters (``...`` marks a cut): for echoing client input in errors."""
    return text if len(text) <= limit else text[:limit] + "..."


class APIError(Exception):
    """An error the client caused or must react to; rendered as an OpenAI error body."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers

    def to_response(self) -> JSONResponse:
        return error_response(
            self.status_code, self.message, self.error_type, self.param, self.code, self.headers
        )


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "body_too_large"


class QueueFullError(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"


class ShuttingDownError(APIError):
    status_code = 503
    error_type = "server_error"
    default_code = "shutting_down"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=error_type, param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status, headers=headers)


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message (and the first offending field) from pydantic's error list.

    Union types fail once per branch; only the first failure of each top-level field is reported.
    """
    parts, fields = [], []
    for err in errors:
        if err.get("type") == "json_invalid":
            return f"Request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # Drop pydantic's union-branch names ("str", "list[int]", "function-after[...]") from the path.
        loc = [x for x in loc if not x.startswith(("function-", "list[", "str", "int", "float", "bool"))]
        field = loc[0] if loc else None
        if field in fields:
            continue
        fields.append(field)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "Invalid request: " + "; ".join(parts[:5]), next((f for f in fields if f), None)


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _describe_validation(list(exc.errors()))
    return error_response(400, message, "invalid_request_error", param)


async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return exc.to_response()


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, str(exc.detail), error_type, headers=exc.headers)


async def _engine_dead_handler(request: Request, exc: EngineDeadError) -> JSONResponse:
    return error_response(503, str(exc), "server_error", code="engine_dead")


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"Internal server error: {type(exc).__name__}", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, _api_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(EngineDeadError, _engine_dead_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_handler)


def sse_error(exc: APIError) -> str:
    """An error sent inside an already-started SSE stream."""
    return f"data: {json.dumps(error_body(exc.message, exc.error_type, exc.param, exc.code))}\n\n"
