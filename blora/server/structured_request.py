"""The request fields that constrain the output -> one ``StructuredOutputsParams`` (or None).

OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema`` with or without ``strict``: the
schema is always enforced) and vLLM's ``structured_outputs`` / ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar``. At most one of them per request; a 400 names the field that is wrong.
"""

from __future__ import annotations

import asyncio
from typing import Any

from blora.engine.sampling_params import SamplingParamError, StructuredOutputsParams
from blora.engine.structured import StructuredOutputs
from blora.server.errors import InvalidRequestError

# vLLM's structured_outputs keys: the constraint ones, and options that cannot change what is enforced.
_SO_KEYS = {"json", "regex", "choice", "grammar", "json_object"}
_SO_OPTIONS = {"disable_fallback", "disable_any_whitespace", "disable_additional_properties", "backend"}
_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def _response_format(rf: dict[str, Any]) -> StructuredOutputsParams | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequestError(
                "response_format.json_schema must be an object with a 'schema' object (and a 'name')",
                param="response_format",
            )
        return StructuredOutputsParams(json=spec.get("schema", {}))
    raise InvalidRequestError(
        f"response_format.type {str(kind)[:40]!r} is not supported; use 'text', 'json_object' or 'json_schema'",
        param="response_format",
    )


def _structured_outputs(so: dict[str, Any]) -> StructuredOutputsParams:
    unknown = sorted(set(so) - _SO_KEYS - _SO_OPTIONS)
    if unknown:
        raise InvalidRequestError(
            f"structured_outputs.{unknown[0][:40]} is not supported; use one of {', '.join(sorted(_SO_KEYS))}",
            param="structured_outputs",
        )
    backend = so.get("backend")
    if backend not in (None, "auto", "xgrammar"):
        raise InvalidRequestError(
            "structured_outputs.backend may be 'auto' or 'xgrammar'", param="structured_outputs"
        )
    return StructuredOutputsParams(**{k: v for k, v in so.items() if k in _SO_KEYS})


def structured_of(req: Any) -> tuple[StructuredOutputsParams | None, str | None]:
    """(the request's constraint, the field it came from); 400 if several are given or one is malformed."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        spec = _response_format(rf)
        if spec is not None:
            found.append(("response_format", spec))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", _structured_outputs(req.structured_outputs)))
    for name, kind in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            found.append((name, StructuredOutputsParams(**{kind: value})))
    if not found:
        return None, None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InvalidRequestError(f"Give at most one output constraint; got {names}", param=found[1][0])
    param, spec = found[0]
    try:
        spec.validate()
    except SamplingParamError as exc:
        raise InvalidRequestError(f"{param}: {exc}", param=param) from None
    return spec, param


def compiler_of(serving: Any) -> StructuredOutputs:
    """The engine's grammar compiler (``EngineClient.structured_outputs``): in this process the engine's own,
    so the engine finds the grammar in its cache; on Ray one for the replicas' tokenizer and vocabulary."""
    return serving.engine.structured_outputs


async def compile_checked(serving: Any, spec: StructuredOutputsParams, param: str) -> None:
    """Compile ``spec`` in a worker thread (time- and size-bounded); a 400 naming ``param`` if it fails."""
    compiler = compiler_of(serving)
    try:
        await asyncio.get_running_loop().run_in_executor(None, compiler.compile, spec)
    except SamplingParamError as exc:
        raise InvalidRequestError(f"{param}: {exc}", param=param) from None
