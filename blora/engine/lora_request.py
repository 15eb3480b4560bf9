"""``LoRARequest``: vLLM's way of naming an adapter per request, beside blora's ``adapters=`` names.

``LLM.generate(..., lora_request=LoRARequest("sql", 1, "/path/to/sql"))`` loads the adapter under its
``lora_name`` on first use (validated then, errors raised to the caller) and runs the prompt on it; later
requests with the same name reuse it. A ``lora_int_id`` is tied to one (name, path): reusing it for another
adapter, or a loaded name for another path, is refused rather than silently serving different weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for a request (vLLM's ``vllm.lora.request.LoRARequest`` fields).

    ``lora_name``: the adapter's name (also its model id on the server); ``lora_int_id``: a positive id,
    unique per adapter; ``lora_path``: the PEFT adapter directory (or a hub id in the local cache);
    ``base_model_name``: accepted for vLLM compatibility and not used (blora serves one base model).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name must be a non-empty string, got {self.lora_name!r}")
        if (
            isinstance(self.lora_int_id, bool)
            or not isinstance(self.lora_int_id, int)
            or self.lora_int_id < 1
        ):
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, (str, os.PathLike)) or not str(self.lora_path):
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path must name the adapter directory")

    # vLLM's aliases
    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return str(self.lora_path)


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


class LoRARequestRegistry:
    """Checks ``LoRARequest``s against the loaded adapters and the ids seen so far."""

    def __init__(self) -> None:
        self._ids: dict[int, tuple[str, str]] = {}

    def needs_load(self, req: LoRARequest, source: str | None) -> bool:
        """True if ``req``'s adapter is not loaded yet (``source``: where the adapter of that name is served
        from, None if none is); ``ValueError`` if it conflicts with what is."""
        seen = self._ids.get(req.lora_int_id)
        if seen is not None and (seen[0] != req.lora_name or not _same_source(seen[1], req.path)):
            raise ValueError(
                f"lora_int_id {req.lora_int_id} is already used by adapter {seen[0]!r} ({seen[1]}); "
                f"give {req.lora_name!r} ({req.path}) its own id"
            )
        if source is None:
            return True
        if not _same_source(str(source), req.path):
            raise ValueError(
                f"adapter {req.lora_name!r} is already loaded from {source}, not {req.path}; use another "
                "lora_name, or load_adapter(name, path, replace=True) to swap it"
            )
        self._ids[req.lora_int_id] = (req.lora_name, req.path)
        return False

    def loaded(self, req: LoRARequest) -> None:
        self._ids[req.lora_int_id] = (req.lora_name, req.path)


def per_prompt_requests(
    lora_request: LoRARequest | Sequence[LoRARequest | None] | None, adapters: object, n: int
) -> list[LoRARequest | None] | None:
    """``lora_request`` as one entry per prompt (None: not given); refuses it together with ``adapters``."""
    if lora_request is None:
        return None
    if adapters is not None:
        raise ValueError("pass adapters= or lora_request=, not both")
    if isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    requests = list(lora_request)
    if len(requests) != n:
        raise ValueError(
            f"lora_request has {len(requests)} entries for {n} prompts; pass one, or one per prompt"
        )
    for r in requests:
        if r is not None and not isinstance(r, LoRARequest):
            raise TypeError(f"lora_request entries must be LoRARequest or None, got {type(r).__name__}")
    return requests


def adapter_names(
    requests: list[LoRARequest | None],
    registry: LoRARequestRegistry,
    adapter_source: Callable[[str], str | None],
    load: Callable[[str, str], object],
) -> list[str | None]:
    """The adapter name of each request, loading (``load(name, path)``) those not loaded yet."""
    names: list[str | None] = []
    for req in requests:
        if req is None:
            names.append(None)
            continue
        if registry.needs_load(req, adapter_source(req.lora_name)):
            load(req.lora_name, req.path)
            registry.loaded(req)
        names.append(req.lora_name)
    return names
