"""Request checks shared by the engine and the server: one rule each, errors naming the field.

The engine runs them when a request is queued; the server runs the same functions before it submits a
request (so a refusal is a 400 naming the field, and a request the server accepts is one the engine
accepts). Token ids are checked against the model's vocabulary, ``vocab_size``: the rows of its input
embeddings, i.e. every id the model can read or sample (it may exceed the tokenizer's length).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from blora.engine.sampling_params import SamplingParamError


class ContextLengthError(SamplingParamError):
    """Prompt + max_tokens do not fit the model's context (``param`` is ``max_tokens``)."""

    code = "context_length_exceeded"


def check_token_ids(param: str, ids: Iterable[int], vocab_size: int, label: str | None = None) -> None:
    """``SamplingParamError`` naming ``param`` if an id is outside ``[0, vocab_size)``; the message calls
    the ids ``label`` (default: ``param``)."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise SamplingParamError(
            param, f"{label or param} {bad[:5]} are outside the vocabulary [0, {vocab_size})"
        )


def check_prompt_ids(ids: Sequence[int], vocab_size: int) -> None:
    """A prompt has at least one token, each in the vocabulary (``SamplingParamError`` naming ``prompt``)."""
    if not ids:
        raise SamplingParamError("prompt", "The prompt is empty: it must have at least one token")
    check_token_ids("prompt", ids, vocab_size, "prompt token ids")


def resolve_max_tokens(
    prompt_len: int, max_tokens: int | None, max_model_len: int, default: int | None = None
) -> int:
    """The request's effective max_tokens: ``max_tokens``, else ``default`` capped by the room left, else
    the room left (``max_model_len - prompt_len``). ``ContextLengthError`` if the prompt and max_tokens do
    not fit in ``max_model_len`` (or the prompt leaves no room)."""
    room = max_model_len - prompt_len
    if max_tokens is None:
        max_tokens = room if default is None else min(room, default)
    if room < 1 or max_tokens > room:
        raise ContextLengthError(
            "max_tokens",
            f"This model's maximum context length is {max_model_len} tokens (max_model_len). However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens.",
        )
    return max_tokens
