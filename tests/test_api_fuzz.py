"""Property-based fuzz of the HTTP API: schemathesis generates requests from the app's own OpenAPI schema.

Every operation gets a bounded number of generated requests (schema-valid bodies, and for operations with
input also schema-breaking ones), sent in-process (ASGI, no socket) to the real app over a real
``AsyncLLM`` on a tiny random Llama with two adapters. Properties:

- no 5xx anywhere;
- every 4xx body is OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``;
- a stream that started never carries a server error;
- afterwards nothing leaked: no request in flight, every KV block free, every adapter unloadable.

Half of the schema-valid generation requests are steered to a served model (random names would only ever
test the 404); a second test throws extreme numbers at every numeric field of a valid request. Hypothesis
runs derandomized (fixed seeds, no example database): a failure reproduces, CI is never flaky.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

import torch  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from blora.engine import AsyncLLM  # noqa: E402
from blora.server import ServerConfig, create_app  # noqa: E402
from blora.server.protocol import CHAT_NOT_IMPLEMENTED, NOT_IMPLEMENTED  # noqa: E402
from tests.helpers import make_adapter, targets, tiny_model, tokenizer  # noqa: E402

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BASE = "tiny-base"
ADAPTERS = {"fuzz-adapter-a": "a", "fuzz-adapter-b": "b"}  # name -> folder under the adapter root
MAX_EXAMPLES = 25  # per operation and generation mode
ERROR_FIELDS = {"message", "type", "param", "code"}
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failing run stays short; the note has curl
)

# Every operation of the app's schema (test_every_operation_is_fuzzed keeps this complete), and whether it
# takes input that can break the schema (negative cases). GET /v1/models/{model_id}: every string is valid.
OPERATIONS = {
    "GET /health": False,
    "GET /metrics": False,
    "GET /version": False,
    "GET /v1/models": False,
    "GET /v1/models/{model_id}": False,
    "POST /v1/completions": True,
    "POST /v1/chat/completions": True,
    "POST /v1/load_lora_adapter": True,
    "POST /v1/unload_lora_adapter": True,
    "GET /ping": False,
    "POST /ping": False,
    "POST /tokenize": True,
    "POST /detokenize": True,
}
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label, has_input in OPERATIONS.items() if has_input
]
GENERATION = ("POST /v1/completions", "POST /v1/chat/completions")

# Steering: None keeps the generated model name; the others replace it (half of the cases).
MODELS = (None, None, None, BASE, *ADAPTERS)
UNSUPPORTED = (
    *("logit_bias", "adapter_mixture", "tools", "tool_choice", "response_format", "best_of", "suffix"),
    *("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"),
    *("min_tokens", "allowed_token_ids", "guided_decoding_backend", "modalities"),
    *NOT_IMPLEMENTED,  # accepted only at their default values
    *CHAT_NOT_IMPLEMENTED,
)
VOCAB = 1000  # token ids of steered requests are taken modulo this (the tokenizer has more)


class ErrorLog(logging.Handler):
    """Collects blora's ERROR records: a failed engine step, an unhandled exception behind a 500, a
    stream that failed. Any of them means a request got past validation that should not have."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        taken, self.records = self.records, []
        return [
            f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else r.getMessage() for r in taken
        ]


@dataclass
class Fuzzed:
    app: FastAPI
    engine: AsyncLLM
    schema: Any
    errors: ErrorLog
    statuses: dict[str, Counter] = field(default_factory=dict)

    def call(self, label: str, body: dict[str, Any]) -> Any:
        """Send a hand-made body to an operation through the same ASGI transport as the fuzz."""
        return self.schema.find_operation_by_label(label).Case(body=body).call(headers=AUTH, timeout=60)

    def restore_adapters(self) -> None:
        """Reload a served adapter a fuzz case unloaded (generated names do hit them)."""
        for name, folder in ADAPTERS.items():
            if name not in self.engine.list_adapters():
                response = self.call("POST /v1/load_lora_adapter", {"lora_name": name, "lora_path": folder})
                assert response.status_code == 200, response.text


class WithoutLifespan:
    """The app with a no-op lifespan. Schemathesis' pytest plugin ends the lifespan of every ASGI app it
    reached after each test (this app would drain and answer 503), while one app serves the whole module:
    the fixture runs the real lifespan around all tests."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return


def build_app(root: Path) -> tuple[FastAPI, AsyncLLM]:
    base = tiny_model("llama")
    make_adapter(base, root / "a", seed=1, r=4, target_modules=targets("llama", "attn"))
    make_adapter(base, root / "b", seed=2, r=8, target_modules=targets("llama", "mlp"))
    engine = AsyncLLM(
        base,
        tokenizer=tokenizer(),
        adapters={name: str(root / folder) for name, folder in ADAPTERS.items()},
        block_size=4,
        max_num_seqs=16,
        max_model_len=128,
    )
    config = ServerConfig(
        served_model_name=BASE,
        model_source="tiny",
        api_key=KEY,
        max_num_seqs=16,
        max_queue=64,
        adapter_root=root,
        allow_runtime_adapters=True,
    )
    return create_app(engine, config), engine


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; a second thread only slows them on a busy machine
    errors, blora_log = ErrorLog(), logging.getLogger("blora")
    blora_log.addHandler(errors)
    try:
        app, engine = build_app(tmp_path_factory.mktemp("fuzz-adapters"))
        with TestClient(app):  # the app's lifespan around all tests; its end shuts the engine down
            schema = schemathesis.openapi.from_asgi("/openapi.json", WithoutLifespan(app), headers=AUTH)
            yield Fuzzed(app, engine, schema, errors)
    finally:
        blora_log.removeHandler(errors)
        torch.set_num_threads(before)


# --- the properties --------------------------------------------------------------------------------


def content_type(response: Any) -> str:
    values = response.headers.get("content-type") or [""]  # schemathesis: header -> list of values
    return values[0].partition(";")[0].strip()


def check_error_body(body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == ERROR_FIELDS, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err


def check_stream(response: Any) -> None:
    """An SSE stream's error events (if any) are OpenAI-shaped client errors, never a server error."""
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                check_error_body(event)
                assert event["error"]["type"] != "server_error", event


def check_response(response: Any) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:1000]}"
    if response.status_code >= 400:
        assert content_type(response) == "application/json", response.text[:500]
        check_error_body(response.json())
    elif content_type(response) == "text/event-stream":
        check_stream(response)


def checked_call(fuzzed: Fuzzed, case: Any, label: str) -> Any:
    response = case.call(headers=AUTH, timeout=60)
    fuzzed.statuses.setdefault(label, Counter())[response.status_code] += 1
    try:
        check_response(response)
        errors = fuzzed.errors.take()
        assert not errors, f"the request passed validation and failed inside: {errors}"
    except AssertionError as exc:
        exc.add_note(f"Reproduce with: {case.as_curl_command(headers=AUTH)}")
        raise
    return response


def steer(body: dict[str, Any], model: str) -> None:
    """Make a generated generation request likely to reach the engine: a served model, no unsupported
    features, token ids in the vocabulary, a short output (the unsteered half tests the refusals)."""
    body["model"] = model
    for name in UNSUPPORTED:
        body.pop(name, None)
    if body.get("stream") is not True:
        body.pop("stream_options", None)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = [[abs(t) % VOCAB for t in p] if isinstance(p, list) else p for p in prompt]
        body["prompt"] = [abs(t) % VOCAB if isinstance(t, int) else t for t in prompt]
    for name, limit in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 3)):
        if isinstance(body.get(name), int):
            body[name] = min(body[name], limit)


def test_every_operation_is_fuzzed(fuzzed):
    labels = {op.ok().label for op in fuzzed.schema.get_all_operations()}
    assert labels == set(OPERATIONS)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode.value}" for label, mode in CASES])
def test_api_fuzz(fuzzed, label, mode):
    operation = fuzzed.schema.find_operation_by_label(label)

    @given(case=operation.as_strategy(generation_mode=mode), model=st.sampled_from(MODELS))
    @FUZZ_SETTINGS
    def fuzz(case: Any, model: str | None) -> None:
        steered = model is not None and mode.is_positive and isinstance(case.body, dict)
        if steered and label in GENERATION:
            steer(case.body, model)
        elif steered and label == "POST /v1/load_lora_adapter":
            case.body["lora_path"] = ADAPTERS.get(model, "a")
        response = checked_call(fuzzed, case, label)
        if label == "POST /v1/load_lora_adapter" and response.status_code == 200:
            fuzzed.call("POST /v1/unload_lora_adapter", {"lora_name": case.body["lora_name"]})
        fuzzed.restore_adapters()

    fuzz()
    if label in GENERATION and mode.is_positive:  # the fuzz must not stop at validation
        assert fuzzed.statuses[label][200] > 0, fuzzed.statuses[label]


# Integers around every boundary an engine dtype has (int32, int64, uint64) and far beyond.
EDGES = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**20, -(2**63) - 1]
INTS = st.one_of(st.sampled_from(EDGES), st.integers(-(2**70), 2**70), st.integers(0, 70_000))
FLOAT_EDGES = [0.0, -0.0, 1e-300, -1e-300, 1e300, -1e300, 2.0, 2.0001, -2.0001]
FLOATS = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(-1e6, 1e6))
NUMERIC = {
    "top_k": INTS,
    "seed": INTS,
    "n": INTS,
    "max_tokens": INTS,
    "stop_token_ids": st.lists(INTS, max_size=3),
    "temperature": FLOATS,
    "top_p": FLOATS,
    "min_p": FLOATS,
    "repetition_penalty": FLOATS,
    "presence_penalty": FLOATS,
    "frequency_penalty": FLOATS,
}
COMPLETION_ONLY = {"logprobs": INTS, "prompt": st.lists(INTS, min_size=1, max_size=4)}
BOOLS = st.booleans()
CHAT_ONLY = {"top_logprobs": INTS, "max_completion_tokens": INTS, "logprobs": BOOLS}


def numeric_fields(label: str) -> st.SearchStrategy[dict[str, Any]]:
    """One or two numeric fields at a time: with more, one invalid value would refuse nearly every request
    before the others reach the engine."""
    extra = COMPLETION_ONLY if label == "POST /v1/completions" else CHAT_ONLY
    fields = {**NUMERIC, **extra}
    pair = st.sampled_from(sorted(fields)).flatmap(lambda name: st.tuples(st.just(name), fields[name]))
    return st.lists(pair, min_size=1, max_size=2).map(dict)


def generation_body(label: str, model: str, stream: bool, fields: dict[str, Any]) -> dict[str, Any]:
    if label == "POST /v1/completions":
        base: dict[str, Any] = {"prompt": "Hi"}
    else:
        base = {"messages": [{"role": "user", "content": "Hi"}]}
    return {**base, "model": model, "max_tokens": 4, "stream": stream, **fields}


def edge_values(strategy: st.SearchStrategy) -> list[Any]:
    if strategy is INTS:
        return EDGES
    if strategy is FLOATS:
        return FLOAT_EDGES
    if strategy is BOOLS:
        return [True, False]
    return [[e] for e in EDGES]  # the lists of integers


@pytest.mark.parametrize("label", GENERATION)
def test_each_numeric_field_at_each_edge(fuzzed, label):
    """The table behind the property below: every numeric field alone at every edge value, streamed and
    not, to the base model and an adapter: 200 or 400, never a 500 or a failed engine step."""
    extra = COMPLETION_ONLY if label == "POST /v1/completions" else CHAT_ONLY
    operation = fuzzed.schema.find_operation_by_label(label)
    for i, (name, strategy) in enumerate(sorted({**NUMERIC, **extra}.items())):
        for j, value in enumerate(edge_values(strategy)):
            model = (BASE, *ADAPTERS)[(i + j) % 3]
            body = generation_body(label, model, (i + j) % 2 == 0, {name: value})
            checked_call(fuzzed, operation.Case(body=body), label)


@pytest.mark.parametrize("label", GENERATION)
def test_numeric_fields_at_the_edges(fuzzed, label):
    """Pairs of numeric fields at and far beyond what the engine's dtypes hold: 200 or a 400, never a 500,
    never a failed engine step."""
    operation = fuzzed.schema.find_operation_by_label(label)

    @given(fields=numeric_fields(label), model=st.sampled_from([BASE, *ADAPTERS]), stream=st.booleans())
    @FUZZ_SETTINGS
    def fuzz(fields: dict[str, Any], model: str, stream: bool) -> None:
        body = generation_body(label, model, stream, fields)
        checked_call(fuzzed, operation.Case(body=body), label)

    fuzz()


def test_nothing_leaked_after_the_fuzz(fuzzed):
    """No request in flight, every KV block free, no adapter pinned by a refused or aborted request."""
    stats = fuzzed.engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert stats["kv_usage"] == 0, stats
    assert not fuzzed.app.state.lifecycle.tickets
    for name, folder in ADAPTERS.items():
        response = fuzzed.call("POST /v1/unload_lora_adapter", {"lora_name": name})
        assert response.status_code == 200, response.text
        response = fuzzed.call("POST /v1/load_lora_adapter", {"lora_name": name, "lora_path": folder})
        assert response.status_code == 200, response.text
