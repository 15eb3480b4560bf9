"""Per-request sampling settings, validated when built and again when a request is queued.

Every bound here is what the engine can compute with, so nothing that passes reaches a step and fails
there: integers that become tensors fit int32 (``top_k``), seeds fit ``torch.Generator.manual_seed``
(int64), floats stay finite in float32 after the sampler's arithmetic, and the per-token work of stop
strings / stop token ids is bounded.
"""

from __future__ import annotations

import json
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
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (OpenAI allows 300)
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's range: -100 bans a token, 100 all but forces it
MAX_ALLOWED_TOKEN_IDS = 1 << 17  # more than any vocabulary
MAX_BAD_WORDS = 256
MAX_BAD_WORD_CHARS = 256
MAX_MIN_TOKENS = 1 << 20
# Structured outputs: input sizes bound the grammar compiler's time and memory (blora.engine.structured).
MAX_SCHEMA_CHARS = 64 * 1024
MAX_REGEX_CHARS = 4 * 1024
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024


class SamplingParamError(ValueError):
    """An invalid sampling setting; ``param`` names the field (a server reports it as the error's param)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # picklable (Ray sends errors between processes)
        return type(self), (self.param, str(self))


@dataclass
class StructuredOutputsParams:
    """A constraint on the output (vLLM's ``StructuredOutputsParams``): exactly one of ``json`` (a JSON
    schema, dict or JSON text), ``regex``, ``choice`` (one of these strings), ``grammar`` (EBNF / GBNF) or
    ``json_object`` (any JSON object). Bounds: schema and grammar 64 KiB, regex 4 KiB, 256 choices."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def kind(self) -> str:
        """The one constraint set: "json" | "regex" | "choice" | "grammar" | "json_object"."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))

    def validate(self) -> None:
        """Sizes and types (``SamplingParamError`` naming ``structured_outputs.<kind>``); the grammar itself
        is compiled (and checked) by the engine."""
        set_ = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(set_) != 1:
            raise SamplingParamError(
                "structured_outputs",
                f"structured_outputs needs exactly one of {', '.join(_CONSTRAINTS)}; got "
                f"{', '.join(set_) or 'none'}",
            )
        kind = set_[0]
        param = f"structured_outputs.{kind}"
        if kind == "json":
            self.json = _json_schema(self.json, param)
        elif kind == "json_object" and self.json_object is not True:
            raise SamplingParamError(param, "json_object must be true or unset")
        elif kind in ("regex", "grammar"):
            limit = MAX_REGEX_CHARS if kind == "regex" else MAX_GRAMMAR_CHARS
            value = getattr(self, kind)
            if not isinstance(value, str) or not value or len(value) > limit:
                raise SamplingParamError(
                    param, f"{kind} must be a non-empty string of at most {limit} characters"
                )
        elif kind == "choice":
            c = self.choice
            if (
                not isinstance(c, (list, tuple))
                or not 1 <= len(c) <= MAX_CHOICES
                or not all(isinstance(x, str) and x and len(x) <= MAX_CHOICE_CHARS for x in c)
            ):
                raise SamplingParamError(
                    param,
                    f"choice must be a list of 1 to {MAX_CHOICES} non-empty strings of up to "
                    f"{MAX_CHOICE_CHARS} characters",
                )
            self.choice = list(c)

    def key(self) -> str:
        """A canonical text of the constraint: the cache key of its compiled grammar."""
        kind = self.kind()
        value = getattr(self, kind)
        return f"{kind}:{json.dumps(value, sort_keys=True, separators=(',', ':'))}"


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


def _json_schema(schema: object, param: str) -> dict:
    if isinstance(schema, str):
        if len(schema) > MAX_SCHEMA_CHARS:
            raise SamplingParamError(param, f"the JSON schema is longer than {MAX_SCHEMA_CHARS} characters")
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise SamplingParamError(param, f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise SamplingParamError(param, f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError) as exc:
        raise SamplingParamError(param, f"the JSON schema is not serializable as JSON: {exc}") from None
    if size > MAX_SCHEMA_CHARS:
        raise SamplingParamError(param, f"the JSON schema is longer than {MAX_SCHEMA_CHARS} characters")
    return schema


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
    ``prompt_logprobs=k`` returns the same for every prompt token (the first is None): the request is then
    computed over its whole prompt, never from prefix-cached blocks.
    ``max_tokens=None`` means up to the model's length limit.

    vLLM's extras: ``min_tokens`` keeps EOS and ``stop_token_ids`` from being sampled before that many
    tokens; ``include_stop_str_in_output`` keeps the stop string at the end of the text; ``logit_bias``
    ``{token_id: bias}`` is added to the logits (-100 bans a token); ``allowed_token_ids`` restricts
    sampling to those ids; ``bad_words`` are never generated (a word's last token is banned whenever the
    output ends with the word's other tokens, with and without a leading space); ``skip_special_tokens``
    (default True) leaves special tokens out of the text; ``structured_outputs`` constrains the output to a
    JSON schema, regex, choice or grammar (``blora.engine.structured``).

    Ranges (``ValueError`` naming the field otherwise): ``n`` 1..256, ``temperature`` 0..1e4, ``top_k`` -1..
    2**31-1, ``repetition_penalty`` 0.01..100, presence / frequency penalties -2..2, ``logprobs`` and
    ``prompt_logprobs`` 0..20, at most 16 stop strings of up to 256 characters and 256 stop token ids.
    The engine checks token ids against the model's vocabulary when the request is queued
    (``blora.engine.validation``).
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
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
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
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        self.stop_strings = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)
        self._validate_extras()

    def _validate_extras(self) -> None:
        _check_int("min_tokens", self.min_tokens, 0, MAX_MIN_TOKENS)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamError(
                "min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamError(name, f"{name} must be a bool, got {_short(getattr(self, name))}")
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or len(ids) > MAX_ALLOWED_TOKEN_IDS:
                raise SamplingParamError(
                    "allowed_token_ids",
                    f"allowed_token_ids must be a non-empty list of at most {MAX_ALLOWED_TOKEN_IDS} ids",
                )
            self.allowed_token_ids = _token_ids("allowed_token_ids", ids)
        self.bad_words = _bad_words(self.bad_words)
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise SamplingParamError(
                    "structured_outputs",
                    "structured_outputs must be a StructuredOutputsParams, got "
                    f"{type(self.structured_outputs).__name__}",
                )
            self.structured_outputs.validate()
            if self.ignore_eos:
                raise SamplingParamError(
                    "ignore_eos",
                    "ignore_eos cannot be combined with structured_outputs (the grammar ends "
                    "the output with EOS)",
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def uses_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def uses_logits_processors(self) -> bool:
        """Whether the sampler changes this row's logits before sampling (bias, masks, grammar)."""
        return bool(
            self.min_tokens
            or self.logit_bias
            or self.allowed_token_ids is not None
            or self.bad_words
            or self.structured_outputs is not None
        )


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


def _token_ids(name: str, ids: object) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_INT32 for t in ids
    ):
        raise SamplingParamError(
            name, f"{name} must be a list of token ids in [0, {MAX_INT32}], got {_short(ids)}"
        )
    return list(ids)


def _logit_bias(bias: object) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise SamplingParamError(
            "logit_bias", f"logit_bias must be a dict of at most {MAX_LOGIT_BIAS} {{token_id: bias}} entries"
        )
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)  # JSON object keys are strings: "50256"
        except (TypeError, ValueError):
            raise SamplingParamError(
                "logit_bias", f"logit_bias key {_short(key)} is not a token id"
            ) from None
        _token_ids("logit_bias", [token])
        _check_float("logit_bias", value, *LOGIT_BIAS_RANGE)
        out[token] = float(value)
    return out


def _bad_words(words: object) -> list[str] | None:
    if words is None:
        return None
    if (
        not isinstance(words, (list, tuple))
        or len(words) > MAX_BAD_WORDS
        or not all(isinstance(w, str) and w.strip() and len(w) <= MAX_BAD_WORD_CHARS for w in words)
    ):
        raise SamplingParamError(
            "bad_words",
            f"bad_words must be a list of at most {MAX_BAD_WORDS} non-blank strings of up to "
            f"{MAX_BAD_WORD_CHARS} characters",
        )
    return list(words)
