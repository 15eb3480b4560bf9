"""Per-request sampling settings, validated when built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this temperature a request is decoded greedily (dividing logits by ~0 overflows).
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request (names and semantics follow vLLM / OpenAI).

    ``temperature=0`` is greedy. ``top_k`` 0 or -1, ``top_p`` 1 and ``min_p`` 0 switch those filters off.
    Penalties follow OpenAI (presence / frequency over generated tokens) and HF (repetition over prompt and
    generated tokens). ``seed`` makes a request's samples independent of the rest of the batch.
    ``stop`` strings end generation and are never part of the returned text; ``stop_token_ids`` end it too
    (the token is kept). ``logprobs=k`` returns, per generated token, its log-probability under the model
    (before penalties and temperature) and the ``k`` most likely tokens. ``max_tokens=None`` means up to
    the model's length limit.
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
        _check_int("n", self.n, low=1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_float("temperature", self.temperature, "must be >= 0", lambda v: v >= 0)
        _check_float("top_p", self.top_p, "must be in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("top_k", self.top_k, low=-1)
        _check_float("min_p", self.min_p, "must be in [0, 1]", lambda v: 0 <= v <= 1)
        _check_float("repetition_penalty", self.repetition_penalty, "must be > 0", lambda v: v > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), "must be in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.seed is not None:
            _check_int("seed", self.seed, low=None)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
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


def _check_int(name: str, value: object, low: int | None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_float(name: str, value: object, rule: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not ok(value):
        raise ValueError(f"{name} {rule}, got {value}")


def _stop_strings(stop: list[str] | str | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
    return tuple(items)


def _stop_token_ids(ids: list[int] | None) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
    ):
        raise ValueError(f"stop_token_ids must be a list of token ids >= 0, got {ids!r}")
    return list(ids)
