"""Server hardening: body limit on the bytes received, size bounds before tokenization, no client templates,
an event loop that stays responsive while large prompts and chats are prepared, adapter unload vs request
races, bounded error echoes, and the API docs policy.

Most tests use the scripted fake engine of ``test_server_api``; the latency tests run it behind uvicorn in a
subprocess (so the client's own threads do not share the server's interpreter); the race tests use a real
``AsyncLLM`` on a tiny model, because the race is between the server and the engine thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from blora.engine import AsyncLLM  # noqa: E402
from blora.server import ServerConfig, create_app  # noqa: E402
from blora.server.options import add_serve_arguments, server_config  # noqa: E402
from tests.helpers import make_adapter, targets, tiny_model  # noqa: E402
from tests.helpers import tokenizer as shared_tokenizer  # noqa: E402
from tests.test_server_api import BASE, FakeEngine, assert_error, make_client, sse_events  # noqa: E402

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return shared_tokenizer()


@pytest.fixture
def client(tokenizer):
    c, engine = make_client(tokenizer)
    with c:
        c.engine = engine
        yield c


def error_of(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# --- body limit: counted on the bytes received ------------------------------------------------------


async def post_asgi(app, chunks, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """POST /v1/completions straight into the ASGI app, the body delivered as ``chunks`` (an iterator)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    chunks = iter(chunks)
    pending = next(chunks, b"")
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pending
        if pending is None:
            await asyncio.sleep(3600)  # the app listens for a disconnect: none comes
        body, pending = pending, next(chunks, None)
        return {"type": "http.request", "body": body, "more_body": pending is not None}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def lazy_body(total: int, chunk: int = MIB):
    """``total`` bytes in ``chunk``-sized pieces, made one at a time."""
    for start in range(0, total, chunk):
        yield b"x" * min(chunk, total - start)


def test_chunked_and_lying_bodies_over_the_limit_get_413(tokenizer):
    c, engine = make_client(tokenizer)
    app = c.app
    for headers in ([], [(b"content-length", b"100")], [(b"content-length", b"nonsense")]):
        status, body = asyncio.run(post_asgi(app, lazy_body(40 * MIB), headers))
        assert status == 413, (headers, body[:200])
        err = error_of(body)
        assert err["code"] == "body_too_large" and err["type"] == "invalid_request_error"
    # The same path still serves a chunked body within the limit.
    ok = json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 3}).encode()
    status, body = asyncio.run(post_asgi(app, [ok[:7], ok[7:20], ok[20:]], []))
    assert status == 200, body
    assert len(engine.calls) == 1


def test_body_limit_is_configurable(tokenizer):
    c, _ = make_client(tokenizer, max_body_bytes=1000)
    status, body = asyncio.run(post_asgi(c.app, lazy_body(1001, 100), []))
    assert status == 413 and "1,000 bytes" in error_of(body)["message"]


# --- size bounds before tokenization, no client templates -------------------------------------------


def test_oversized_prompt_is_refused_before_tokenization(tokenizer, monkeypatch):
    c, engine = make_client(tokenizer)
    with c:

        def no_work(*args, **kwargs):
            raise AssertionError("an oversized input was tokenized or templated")

        monkeypatch.setattr(tokenizer, "encode", no_work)
        monkeypatch.setattr(tokenizer, "apply_chat_template", no_work)
        r = c.post("/v1/completions", json={"model": BASE, "prompt": "x" * 20_000_000})
        err = assert_error(r, 400, "prompt", code="context_length_exceeded")
        assert "20,000,000 characters" in err["message"]
        r = c.post("/v1/completions", json={"model": BASE, "prompt": ["ok", "y" * 1_000_000]})
        assert_error(r, 400, "prompt", code="context_length_exceeded")
        messages = [{"role": "user", "content": "z" * 1000}] * 10
        r = c.post("/v1/chat/completions", json={"model": BASE, "messages": messages})
        assert_error(r, 400, "messages", code="context_length_exceeded")
        # Too many messages: refused before validating or templating them one by one.
        r = c.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user"}] * 300_000})
        assert_error(r, 400, "messages")
        # Token-id prompts: the length is checked before every id is.
        r = c.post("/v1/completions", json={"model": BASE, "prompt": [5] * 100_000})
        assert_error(r, 400, code="context_length_exceeded")
        assert engine.calls == []


def test_prompt_char_limit_derives_from_context_and_longest_token(tokenizer):
    c, _ = make_client(tokenizer)
    serving = c.app.state.serving
    longest = max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))
    assert serving.chars_per_token >= longest  # so the bound never refuses a prompt that fits
    assert serving.prompt_char_limit() == FakeEngine.max_model_len * serving.chars_per_token
    c2, _ = make_client(tokenizer, max_prompt_chars=10)
    with c2:
        r = c2.post("/v1/completions", json={"model": BASE, "prompt": "x" * 11, "max_tokens": 2})
        assert "--max-prompt-chars" in assert_error(r, 400, "prompt")["message"]
        assert c2.post(
            "/v1/completions", json={"model": BASE, "prompt": "x" * 10, "max_tokens": 2}
        ).is_success


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chat_template": "{% for i in range(3000) %}{% for j in range(3000) %}x{% endfor %}{% endfor %}"},
        {"chat_template": "{{ messages }}", "enable_thinking": False},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tokenize": True},
        {"messages": []},
        {"tokenizer_kwargs": {"truncation": True}},
    ],
)
def test_clients_cannot_supply_templates_or_call_arguments(client, kwargs):
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": kwargs}
    err = assert_error(client.post("/v1/chat/completions", json=body), 400, "chat_template_kwargs")
    name = "chat_template" if "chat_template" in kwargs else next(iter(kwargs))
    assert f"chat_template_kwargs.{name}" in err["message"]
    assert client.engine.calls == []


def test_template_variables_are_still_passed(client):
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template_kwargs": {"enable_thinking": False},
        "max_tokens": 3,
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200


# --- /health stays fast while large inputs are prepared --------------------------------------------


def serve_fake(port: int, max_model_len: int) -> None:
    """Entry point of the latency tests' server process: the fake engine behind uvicorn."""
    import uvicorn

    engine = FakeEngine(shared_tokenizer())
    engine.max_model_len = max_model_len
    config = ServerConfig(served_model_name=BASE, max_num_seqs=4, max_queue=4)
    uvicorn.run(create_app(engine, config), host="127.0.0.1", port=port, log_level="warning")


@pytest.fixture(scope="module")
def fake_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from tests.test_server_hardening import serve_fake; serve_fake({port}, 50_000)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the fake server exited"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def health_latencies_during(url: str, path: str, body: dict) -> tuple[list[float], httpx.Response]:
    """GET /health every 20 ms while ``body`` is posted to ``path``; the latencies (s) and its response."""
    result: list[httpx.Response] = []
    worker = threading.Thread(
        target=lambda: result.append(httpx.post(url + path, json=body, timeout=300)), daemon=True
    )
    latencies = []
    with httpx.Client(timeout=60) as http:
        http.get(url + "/health")  # connection up before timing
        worker.start()
        time.sleep(0.3)  # the big body is uploaded and being prepared
        while worker.is_alive():
            start = time.perf_counter()
            assert http.get(url + "/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
    worker.join()
    return latencies, result[0]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"model": BASE, "prompt": "Tell me a story about a brave dog. " * 40_000}),
        (
            "/v1/chat/completions",
            {"model": BASE, "messages": [{"role": "user", "content": "Tell me a story. " * 20}] * 4000},
        ),
    ],
    ids=["prompt-1.4M-chars", "chat-4000-messages"],
)
def test_health_answers_fast_while_large_inputs_are_prepared(fake_server, path, body):
    latencies, resp = health_latencies_during(fake_server, path, body)
    # Tokenized (and templated), then refused as too many tokens for the fake's 50,000-token context.
    assert_error(resp, 400, code="context_length_exceeded")
    assert "tokens" in resp.json()["error"]["message"]
    slow = [f"{t * 1e3:.0f} ms" for t in latencies if t >= 0.1]
    assert len(slow) <= len(latencies) // 10, f"/health took {slow} ({len(latencies)} polls)"
    assert len(latencies) >= 5, f"the request took too little time to measure: {latencies}"
    p90 = statistics.quantiles(latencies, n=10)[-1]
    print(
        f"/health during {path}: {len(latencies)} polls, median {statistics.median(latencies) * 1e3:.1f} ms, p90 {p90 * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms"
    )


def test_chunked_body_over_http_gets_413(fake_server):
    r = httpx.post(fake_server + "/v1/completions", content=lazy_body(40 * MIB), timeout=120)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_error(r, 413, code="body_too_large")
    ok = json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 2}).encode()
    headers = {"content-type": "application/json"}
    r = httpx.post(
        fake_server + "/v1/completions", content=iter([ok[:5], ok[5:]]), headers=headers, timeout=60
    )
    assert r.status_code == 200, r.text


# --- adapter unload racing a request: 404 or success, never 200 then an error -----------------------


@pytest.fixture(scope="module")
def race_app(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("race-root")
    model = tiny_model("llama")
    make_adapter(model, root / "r", seed=3, r=4, target_modules=targets("llama", "attn"))
    engine = AsyncLLM(model, tokenizer=shared_tokenizer(), block_size=4)
    config = ServerConfig(
        served_model_name=BASE, adapter_root=root, allow_runtime_adapters=True, shutdown_engine=False
    )
    try:
        yield create_app(engine, config), engine
    finally:
        engine.close()
        torch.set_num_threads(threads)


def assert_404_or_clean_success(resp: httpx.Response, stream: bool) -> str:
    if resp.status_code == 404:
        assert error_of(resp.content)["code"] == "model_not_found"
        return "404"
    assert resp.status_code == 200, resp.text
    if stream:
        events = sse_events(resp)
        assert not [e for e in events if "error" in e], events
    else:
        assert resp.json()["choices"][0]["finish_reason"] == "length"
    return "ok"


async def race(app, engine, unload_first: bool, stream: bool) -> tuple[str, int]:
    """One load -> (request | unload) race -> cleanup round; the engine thread is kept busy 50 ms so that
    the bad interleaving (the engine sees the unload before the request) happens every time."""
    transport = httpx.ASGITransport(app=app)
    body = {"model": "r", "prompt": "Hello there", "max_tokens": 4, "temperature": 0, "stream": stream}
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": "r", "lora_path": "r"})
        assert r.status_code == 200, r.text
        unload = lambda: client.post("/v1/unload_lora_adapter", json={"lora_name": "r"})  # noqa: E731
        request = lambda: client.post("/v1/completions", json=body)  # noqa: E731
        tasks: list[asyncio.Future] = []
        real_generate, real_unload = engine.generate, engine.unload_adapter

        def generate(*args, **kwargs):  # the request was resolved: an unload comes in now
            engine._submit(time.sleep, 0.05)
            tasks.append(asyncio.ensure_future(unload()))
            return real_generate(*args, **kwargs)

        async def unload_adapter(*args, **kwargs):  # the unload is under way: a request comes in now
            engine._submit(time.sleep, 0.05)
            pending = asyncio.ensure_future(real_unload(*args, **kwargs))
            await asyncio.sleep(0)
            tasks.append(asyncio.ensure_future(request()))
            return await pending

        if unload_first:
            engine.unload_adapter = unload_adapter
            first = unload()
        else:
            engine.generate = generate
            first = request()
        try:
            first_resp = await first
            (second_resp,) = await asyncio.gather(*tasks)
        finally:
            engine.__dict__.pop("generate", None)
            engine.__dict__.pop("unload_adapter", None)
        resp, unload_resp = (second_resp, first_resp) if unload_first else (first_resp, second_resp)
        outcome = assert_404_or_clean_success(resp, stream)
        if unload_resp.status_code == 400:  # refused while the request used it: unloadable now
            assert error_of(unload_resp.content)["code"] == "adapter_in_use"
            assert (await unload()).status_code == 200
        else:
            assert unload_resp.status_code == 200, unload_resp.text
        return outcome, unload_resp.status_code


@pytest.mark.parametrize("unload_first", [False, True], ids=["unload-after-resolve", "request-during-unload"])
def test_unload_racing_a_request_is_404_or_success(race_app, unload_first):
    app, engine = race_app
    outcomes = [asyncio.run(race(app, engine, unload_first, stream=i % 2 == 0)) for i in range(12)]
    expected = ("404", 200) if unload_first else ("ok", 400)
    assert set(outcomes) == {expected}, outcomes
    assert app.state.lifecycle.pins.counts == {} and app.state.lifecycle.tickets == {}


# --- small ones: bounded echoes, docs policy ---------------------------------------------------------


def test_unknown_model_404_truncates_the_echoed_name(client):
    name = "m" * 1_000_000
    for resp in (
        client.post("/v1/completions", json={"model": name, "prompt": "hi"}),
        client.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user"}]}),
        client.get("/v1/models/" + "m" * 10_000),
        client.post("/v1/completions", json={"model": BASE, "prompt": "hi", "adapter_mixture": {name: 1.0}}),
    ):
        err = assert_error(resp, 404)
        assert len(resp.content) < 1000 and "m" * 100 + "..." in err["message"], err["message"][:300]


DOCS = ("/docs", "/redoc", "/openapi.json")


def test_docs_public_without_key_behind_key_with_one_and_removable(tokenizer):
    c, _ = make_client(tokenizer)
    assert all(c.get(path).status_code == 200 for path in DOCS)
    c, _ = make_client(tokenizer, api_key="k")
    for path in DOCS:
        assert_error(c.get(path), 401, code="invalid_api_key")
        assert c.get(path, headers={"Authorization": "Bearer k"}).status_code == 200
    assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    c, _ = make_client(tokenizer, disable_docs=True)
    for path in DOCS:
        assert_error(c.get(path), 404)
    args = add_serve_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--disable-docs", "--max-body-mb", "1", "--max-prompt-chars", "5000"]
    )
    config = server_config(args)
    assert config.disable_docs and config.max_body_bytes == MIB and config.max_prompt_chars == 5000
