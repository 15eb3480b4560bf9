"""Per-request sampling settings, validated when built and again when a request is queued.

Every bound here is what the engine can compute with, so nothing that passes reaches a step and fails
there: integers that become tensors fit int32 (``top_k``), seeds fit ``torch.Generator.manual_seed``
(int64), floats stay finite in float32 after the sampler's arithmetic, and the per-token work of stop
strings / stop token ids is bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this temperature a request is decoded greedily (dividing logits by ~0 overflows).
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
MAX_N = 256  # completions per request (each is a sequence in the batch)
MAX_INT32 = 2**31 - 1  # top_k and token ids: the sampler builds int tensors from them
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, what OpenAI's API allows; manual_seed takes it (mod 2**64)
MAX_TEMPERATURE = 1e4  # far above any useful value (OpenAI allows 2); logits / temperature stays normal
REPETITION_PENALTY_RANGE = (1e-2, 1e2)  # a logit is divided or multiplied by it: keep it finite
MAX_STOP_STRINGS = 16  # checked against the text's tail after every token
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


class SamplingParamError(ValueError):
    """An invalid sampling setting; ``param`` names the field (a server reports it as the error's param)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # picklable (Ray sends errors between processes)
        return type(self), (self.param, str(self))


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request (names and semantics follow vLLM / OpenAI).

    ``temperature=0`` is greedy. ``top_k`` 0 or -1, ``top_p`` 1 and ``min_p`` 0 switch those filters off;
    a ``top_k`` at or above the vocabulary size keeps every token (the same as off).
    Penalties follow OpenAI (presence / frequency over generated tokens) and HF (repetition over prompt and
    generated tokens). ``seed`` (a signed 64-bit integer) makes a request's samples independent of the rest
    of the batch. ``stop`` strings end generation and are never part of the returned text;
    ``stop_token_ids`` end it too (the token is kept). ``logprobs=k`` returns, per generated token, its
    log-probability under the model (before penalties and temperature) and the ``k`` most likely tokens.
    ``max_tokens=None`` means up to the model's length limit.

    Ranges (``ValueError`` naming the field otherwise): ``n`` 1..256, ``temperature`` 0..1e4, ``top_k`` -1..
    2**31-1, ``repetition_penalty`` 0.01..100, presence / frequency penalties -2..2, ``logprobs`` 0..20, at
    most 16 stop strings of up to 256 characters and 256 stop token ids. The engine checks token ids
    against the model's vocabulary when the request is queued.
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (``ValueError`` naming it) and normalize ``stop`` / ``stop_token_ids``.
        The engine calls it again when a request is queued: the fields may have been changed since."""
        _check_int("n", self.n, 1, MAX_N)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1)
        _check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("top_k", self.top_k, -1, MAX_INT32)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), -2.0, 2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, *SEED_RANGE)
        if not isinstance(self.ignore_eos, bool):
            raise SamplingParamError(
                "ignore_eos", f"ignore_eos must be a bool, got {_short(self.ignore_eos)}"
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        self.stop_strings = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def uses_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamError(name, f"{name} must be an integer, got {_short(value)}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SamplingParamError(name, f"{name} must be {allowed}, got {_short(value)}")


def _check_float(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingParamError(name, f"{name} must be a finite number, got {_short(value)}")
    if not (low < value <= high if low_open else low <= value <= high):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise SamplingParamError(name, f"{name} must be in {interval}, got {_short(value)}")


def _short(value: object, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters: errors never echo a huge value back."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's int-to-str digit limit
        return f"an {type(value).__name__} too large to print"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _stop_strings(stop: list[str] | str | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise SamplingParamError(
            "stop", f"stop must be a non-empty string or a list of non-empty strings, got {_short(stop)}"
        )
    if len(items) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in items):
        raise SamplingParamError(
            "stop",
            f"stop allows at most {MAX_STOP_STRINGS} strings of up to {MAX_STOP_CHARS} characters each",
        )
    return tuple(items)


def _stop_token_ids(ids: list[int] | None) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_INT32 for t in ids
    ):
        raise SamplingParamError(
            "stop_token_ids",
            f"stop_token_ids must be a list of token ids in [0, {MAX_INT32}], got {_short(ids)}",
        )
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise SamplingParamError(
            "stop_token_ids", f"stop_token_ids allows at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}"
        )
    return list(ids)
