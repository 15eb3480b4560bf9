"""Structured outputs: per-row grammars (JSON schema, regex, choice, EBNF) as token bitmasks over the logits.

Each constrained sequence has its own grammar matcher; every step the sampler fills one bitmask row per
constrained sequence (``[B, ceil(V / 32)]`` int32, bit ``t`` of a row set when token ``t`` may follow) and
applies it to the logits of those rows in one vectorized op; the sampled token then advances the row's
matcher. When the grammar is complete the matcher allows only the stop tokens (the engine's EOS ids), so
the output ends with ``finish_reason="stop"``; a ``max_tokens`` cut before that ends it with ``"length"``.

Grammar engine: xgrammar. Measured on this machine's SmolLM2 tokenizer (vocab 49,152; a 2-core AVX2 CPU,
busy): tokenizer setup 0.37 s (llguidance 1.09 s); first schema compile 20 ms then ~1 ms per schema
(llguidance 7 ms / ~1 ms); bitmask fill for a batch of 32 JSON-schema rows median 0.24 ms, p90 0.31 ms
(llguidance 0.53 ms, p90 15 ms); xgrammar's C++ CPU apply was also the fastest way to apply the mask
(llguidance's torch apply compiled a kernel for 30 s on first use). xgrammar also covers EBNF (GBNF), regex
and JSON schema in one compiler with a cache.

Bounds on compile time and memory: input sizes (``blora.engine.sampling_params``: schema / grammar 64 KiB,
regex 4 KiB, 256 choices), counted repetitions (string lengths and regex ``{n,m}`` up to ``MAX_REPEAT``:
``[a-z]{1,4000}`` took 1.8 s to compile here, ``maxLength: 100000`` 11 s), a compile time limit (``COMPILE_TIMEOUT_S``; the request is refused after it,
the compile thread finishes in the background), the compiled grammar's size (``MAX_GRAMMAR_BYTES``) and an
LRU cache of ``CACHE_SIZE`` compiled grammars keyed by the constraint's canonical text.

Preemption: the engine recomputes a preempted sequence's K/V from its tokens but never re-samples them, so
the matcher (kept per ``Sequence``) stays exactly at the sequence's output.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any

import torch

from blora.engine.sampling_params import SamplingParamError, StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar as xgr  # imported on first use at run time (it loads its native library)

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 30.0  # a maxLength of 300 took 11 s on this busy 2-core machine (load 9)
MAX_GRAMMAR_BYTES = 64 << 20
CACHE_SIZE = 256
COMPILE_THREADS = 2
MAX_REPEAT = 1000  # string length bounds and regex {n,m} counts (see oversized_repeats)
_COUNT = re.compile(r"\{\s*([0-9]+)\s*(?:,\s*([0-9]*)\s*)?\}")

# JSON-schema keywords the grammar enforces (xgrammar's JSON schema converter), and annotations that do
# not constrain the output. Any other keyword is refused by name instead of being silently ignored.
ENFORCED_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum", "const",
        "anyOf", "oneOf", "$ref", "$defs", "definitions", "minLength", "maxLength", "pattern", "minimum",
        "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "format",
        "minProperties", "maxProperties", "patternProperties", "propertyNames",
    }
)  # fmt: skip
ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
        "readOnly", "writeOnly", "strict", "name",
    }
)  # fmt: skip
# Formats checked here against jsonschema's format checker on grammar-constrained random outputs; xgrammar
# accepts more (ipv4 with leading zeros, which jsonschema refuses; email / hostname / uri unverified).
FORMATS = frozenset({"date", "time", "date-time", "duration", "uuid", "ipv6"})
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "propertyNames")


def unsupported_schema_features(schema: Any, path: str = "#") -> list[str]:
    """``"<json pointer>: <keyword>"`` for each keyword of ``schema`` the grammar would not enforce."""
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, dict):
        return [f"{path}: a schema must be an object or a boolean"]
    found = []
    for key, value in schema.items():
        where = f"{path}/{key}"
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED_KEYWORDS:
            found.append(f"{path}: {key}")
        elif key == "format" and value not in FORMATS:
            found.append(f"{where}: format {value!r}")
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                found += unsupported_schema_features(sub, f"{where}/{name}")
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                found += unsupported_schema_features(sub, f"{where}/{i}")
        elif key in _SUBSCHEMAS:
            found += unsupported_schema_features(value, where)
    return found


def oversized_repeats(spec: StructuredOutputsParams) -> list[str]:
    """Counted repetitions above ``MAX_REPEAT`` (string lengths, regex ``{n,m}``): each unrolls into the
    grammar (a ``maxLength`` of 100,000 took 11 s to compile here), so they bound the compile time."""
    kind = spec.kind()
    if kind in ("regex", "grammar"):  # EBNF has {n,m} repetition too
        return _regex_repeats(getattr(spec, kind), kind)
    if kind != "json":
        return []
    found: list[str] = []
    _walk_repeats(spec.json, "#", found)
    return found


def _regex_repeats(regex: str, where: str) -> list[str]:
    counts = [int(n) for m in _COUNT.finditer(regex) for n in m.groups() if n]
    return [f"{where}: a repetition count of {max(counts)}"] if counts and max(counts) > MAX_REPEAT else []


def _walk_repeats(schema: Any, path: str, found: list[str]) -> None:
    if isinstance(schema, list):
        for i, sub in enumerate(schema):
            _walk_repeats(sub, f"{path}/{i}", found)
        return
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in ("minLength", "maxLength") and isinstance(value, int) and value > MAX_REPEAT:
            found.append(f"{path}/{key}: {value}")
        elif key == "pattern" and isinstance(value, str):
            found += _regex_repeats(value, f"{path}/pattern")
        elif isinstance(value, (dict, list)):
            _walk_repeats(value, f"{path}/{key}", found)


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of ``choices`` (string literals escaped as JSON strings)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class StructuredOutputs:
    """Compiles constraints (cached) and keeps one grammar matcher per constrained sequence.

    ``vocab_size``: the model's logits width (may exceed the tokenizer's); ``stop_token_ids``: what ends an
    output (the engine's EOS ids), the only tokens a completed grammar allows.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Seq[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            COMPILE_THREADS, thread_name_prefix="blora-grammar"
        )
        self._matchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._bitmask: torch.Tensor | None = None

    # -- compiling -----------------------------------------------------------------------------------
    def compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams, timeout: float = COMPILE_TIMEOUT_S) -> Any:
        """The compiled grammar of ``spec`` (cached); ``SamplingParamError`` naming the field if it is
        invalid, uses unsupported features, takes longer than ``timeout`` seconds or is too large."""
        spec.validate()
        key = spec.key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        kind = spec.kind()
        param = f"structured_outputs.{kind}"
        if kind == "json":
            bad = unsupported_schema_features(spec.json)
            if bad:
                raise SamplingParamError(
                    param,
                    "the JSON schema uses features structured outputs cannot enforce: "
                    + "; ".join(bad[:10])
                    + ". Remove them or express them with supported keywords.",
                )
        big = oversized_repeats(spec)
        if big:
            raise SamplingParamError(
                param, f"counted repetitions are limited to {MAX_REPEAT}: " + "; ".join(big[:5])
            )
        compiler = self.compiler()
        future = self._pool.submit(_compile, compiler, spec)
        try:
            compiled = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise SamplingParamError(
                param, f"compiling the {kind} took longer than {timeout:g} s; simplify it"
            ) from None
        except Exception as exc:
            raise SamplingParamError(param, f"invalid {kind}: {_first_line(exc)}") from None
        size = compiled.memory_size_bytes
        if size > MAX_GRAMMAR_BYTES:
            raise SamplingParamError(
                param, f"the compiled {kind} takes {size:,} bytes, over the {MAX_GRAMMAR_BYTES:,} limit"
            )
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    # -- per-step work -------------------------------------------------------------------------------
    def matcher(self, seq: Any) -> Any:
        """The grammar matcher of ``seq`` (created at its first sampled token)."""
        m = self._matchers.get(seq)
        if m is None:
            import xgrammar as xgr

            m = xgr.GrammarMatcher(self.compile(seq.params.structured_outputs))
            self._matchers[seq] = m
        return m

    def fill(self, rows: list[int], seqs: Seq[Any], batch: int) -> tuple[torch.Tensor, dict[int, Exception]]:
        """Fill the bitmask rows of ``rows`` (indices into ``seqs``); returns (bitmask [batch, W] int32,
        {row: error} for rows whose grammar failed; those rows are left all-allowed)."""
        import xgrammar as xgr

        words = (self.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < batch or self._bitmask.shape[1] != words:
            self._bitmask = xgr.allocate_token_bitmask(max(batch, 8), self.vocab_size)
        bitmask = self._bitmask[:batch]
        errors: dict[int, Exception] = {}
        for i in rows:
            try:
                self.matcher(seqs[i]).fill_next_token_bitmask(bitmask, i)
            except Exception as exc:
                bitmask[i].fill_(-1)
                errors[i] = exc
        return bitmask, errors

    @staticmethod
    def apply(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Semantics: ``logits[i, t] = -inf`` for every ``i`` in ``rows`` and token ``t`` whose bit
        ``bitmask[i, t // 32] >> (t % 32) & 1`` is 0. In place, one call for all rows (xgrammar's kernel)."""
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)

    def accept(self, seq: Any, token_id: int) -> None:
        """Advance ``seq``'s matcher by its sampled token (``RuntimeError`` if the grammar refuses it)."""
        if not self.matcher(seq).accept_token(token_id):
            raise RuntimeError(f"the grammar of the request refused the sampled token {token_id}")


def _compile(compiler: Any, spec: StructuredOutputsParams) -> Any:
    kind = spec.kind()
    if kind == "json":
        return compiler.compile_json_schema(json.dumps(spec.json), any_whitespace=False, strict_mode=True)
    if kind == "json_object":  # an object (the builtin JSON grammar also allows arrays and scalars)
        return compiler.compile_json_schema(_ANY_OBJECT, any_whitespace=False, strict_mode=False)
    if kind == "regex":
        return compiler.compile_regex(spec.regex)
    if kind == "choice":
        assert spec.choice is not None  # kind() says which field is set
        return compiler.compile_grammar(choice_grammar(spec.choice))
    return compiler.compile_grammar(spec.grammar)


_ANY_OBJECT = json.dumps({"type": "object", "additionalProperties": True})
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")  # xgrammar's "[time] file.cc:line: " prefix


def _first_line(exc: Exception, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _LOCATION.sub("", text)
    return text if len(text) <= limit else text[:limit] + "..."
