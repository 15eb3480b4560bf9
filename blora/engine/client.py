"""``EngineClient``: what the server (and Ray's ingress) needs from an engine, as a typed protocol.

Implemented by ``blora.engine.AsyncLLM`` (one engine in this process) and ``blora.ray.ClusterEngine``
(engine replicas on a Ray cluster); ``blora.server.create_app`` serves either. ``EngineLimits`` carries
the numbers a request is checked against (``blora.engine.validation``), so the server checks exactly what
the engine would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from blora.engine.outputs import RequestOutput
from blora.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from blora.engine.llm_engine import LLMEngine
    from blora.engine.structured import StructuredOutputs


@dataclass(frozen=True)
class EngineLimits:
    """What requests an engine accepts.

    ``max_model_len``: prompt + generated tokens per sequence. ``vocab_size``: token ids must be in
    ``[0, vocab_size)`` (the rows of the model's input embeddings). ``max_loras``: distinct adapters in one
    engine step. ``max_lora_rank``: adapters of a higher rank are refused (None: any rank).
    ``replace_adapters``: ``load_adapter(..., replace=True)`` swaps a loaded adapter's weights in place.
    """

    max_model_len: int
    vocab_size: int
    max_loras: int
    max_lora_rank: int | None = None
    replace_adapters: bool = True

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineLimits:
        """The limits of a built ``LLMEngine``."""
        return cls(
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            max_loras=engine.config.max_loras,
            max_lora_rank=engine.config.max_lora_rank,
        )


@runtime_checkable
class EngineClient(Protocol):
    """An engine the OpenAI server can serve: requests as async streams of ``RequestOutput``, adapters
    loaded and unloaded at run time, and the figures ``/metrics`` reports."""

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer of the served model (the server tokenizes and templates with it)."""
        ...

    @property
    def limits(self) -> EngineLimits: ...

    @property
    def structured_outputs(self) -> StructuredOutputs:
        """The grammar compiler requests are checked with (the engine's own when it runs in this process)."""
        ...

    def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        adapter: str | dict[str, float] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they arrive (the last has ``finished=True``); closing the iterator early
        aborts the request. An invalid request raises ``ValueError`` (with ``param`` naming the field)."""
        ...

    async def abort(self, request_id: str) -> bool:
        """Stop a request; its stream ends with finish_reason "abort". False if it is unknown."""
        ...

    async def load_adapter(
        self, name: str, path: str | Path, replace: bool = False, wait: bool = False
    ) -> None:
        """Load and validate an adapter (``AdapterError`` if broken); ``replace`` swaps a loaded one (see
        ``EngineLimits.replace_adapters``), ``wait`` waits for requests on the old weights to finish."""
        ...

    async def unload_adapter(self, name: str, wait: bool = False) -> None:
        """Unload an adapter; ``AdapterInUseError`` while requests use it (or, with ``wait``, wait)."""
        ...

    def list_adapters(self) -> dict[str, str]:
        """Adapters served now: name -> source."""
        ...

    def adapter_source(self, name: str) -> str | None:
        """``list_adapters().get(name)`` for one name, without listing (the server calls it per request)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Gauges and counters of the engine (``LLMEngine.stats``'s keys), read without blocking."""
        ...

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting requests, let running ones finish for up to ``drain_timeout`` s, abort the rest."""
        ...
