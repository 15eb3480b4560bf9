"""OpenAI-compatible HTTP server: adapters as models, streaming, runtime adapters, metrics, backpressure.

``create_app(engine, config)`` builds the FastAPI app around an engine (``blora.engine.AsyncLLM``);
``blora serve`` / ``python -m blora.server`` run it under uvicorn (see ``blora.server.cli``).
Importing this package does not import FastAPI; the server extras are only needed to serve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blora.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from blora.server import app

        return getattr(app, name)
    raise AttributeError(name)
