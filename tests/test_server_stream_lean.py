"""The SSE response's writes and its cleanup, seen at the ASGI boundary: the ``http.response.body`` messages
the server sends (the chunks rendered from one engine output in one message, the closing usage and
``[DONE]`` in one), and what a client disconnect, a cancelled request task or a failing ``send`` leave behind
(the engine request aborted, the admission ticket released, nothing written after the end).

The app runs on the scripted fake engine of ``test_server_api`` (one token per step).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("fastapi")

from tests.test_server_api import BASE, make_client  # noqa: E402
from tests.test_server_api import tokenizer as tokenizer  # noqa: E402,F401  (the module fixture)

Receive = Callable[[], Any]


def scope_of(path: str, body: bytes) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip


class Exchange:
    """One request driven straight into the ASGI app: its body, then a disconnect once ``disconnect`` is set."""

    def __init__(self, path: str, body: dict, on_body: Callable[[Exchange], None] | None = None) -> None:
        self.raw = json.dumps(body).encode()
        self.scope = scope_of(path, self.raw)
        self.pending = [{"type": "http.request", "body": self.raw, "more_body": False}]
        self.disconnect = asyncio.Event()
        self.messages: list[dict] = []
        self.on_body = on_body

    async def receive(self) -> dict:
        if self.pending:
            return self.pending.pop()
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and self.on_body is not None:
            self.on_body(self)

    @property
    def bodies(self) -> list[bytes]:
        """The non-empty body messages, in order."""
        return [m["body"] for m in self.messages if m["type"] == "http.response.body" and m.get("body")]

    def events(self, body: bytes) -> list[str]:
        text = body.decode()
        assert text.endswith("\n\n"), text
        events = text[:-2].split("\n\n")
        assert all(e.startswith("data: ") for e in events), events
        return [e[len("data: ") :] for e in events]


def run(app: Any, exchange: Exchange) -> None:
    asyncio.run(app(exchange.scope, exchange.receive, exchange.send))


def chat(max_tokens: int, n: int = 1, **extra: Any) -> dict:
    return {
        "model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens,
        "n": n, "stream": True, **extra,
    }  # fmt: skip


def test_one_write_per_engine_output_and_one_for_the_end(tokenizer):
    client, engine = make_client(tokenizer)
    ex = Exchange("/v1/chat/completions", chat(5, stream_options={"include_usage": True}))
    run(client.app, ex)
    assert ex.messages[0]["type"] == "http.response.start" and ex.messages[0]["status"] == 200
    headers = dict(ex.messages[0]["headers"])
    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert ex.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    bodies = ex.bodies
    assert len(bodies) == 1 + 5 + 1  # the role chunk, one per engine output (step), usage + [DONE]
    assert [len(ex.events(b)) for b in bodies] == [1, 1, 1, 1, 1, 1, 2]
    role, *steps, end = bodies
    assert json.loads(ex.events(role)[0])["choices"][0]["delta"]["role"] == "assistant"
    last = json.loads(ex.events(steps[-1])[0])["choices"][0]
    assert last["finish_reason"] == "length"
    usage, done = ex.events(end)
    assert json.loads(usage)["usage"]["completion_tokens"] == 5 and done == "[DONE]"
    assert engine.active == {} and client.app.state.lifecycle.tickets == {}


def test_the_choices_of_one_engine_output_share_a_write(tokenizer):
    client, _ = make_client(tokenizer)
    ex = Exchange("/v1/chat/completions", chat(3, n=2))
    run(client.app, ex)
    bodies = ex.bodies
    assert [len(ex.events(b)) for b in bodies] == [2, 2, 2, 2, 1]  # roles, 3 steps x 2 choices, [DONE]
    for body in bodies[1:-1]:
        indices = [json.loads(e)["choices"][0]["index"] for e in ex.events(body)]
        assert sorted(indices) == [0, 1]


def test_several_prompts_stream_every_choice(tokenizer):
    client, _ = make_client(tokenizer)
    body = {"model": BASE, "prompt": ["Hello", "Bye"], "max_tokens": 3, "n": 2, "stream": True}
    ex = Exchange("/v1/completions", body)
    run(client.app, ex)
    events = [json.loads(e) for b in ex.bodies for e in ex.events(b) if e != "[DONE]"]
    finished = sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"] == "length")
    assert finished == [0, 1, 2, 3]
    assert ex.events(ex.bodies[-1])[-1] == "[DONE]"


def test_client_disconnect_mid_stream_aborts_and_releases(tokenizer):
    client, engine = make_client(tokenizer)
    engine.step_s = 0.01

    def hang_up_after_three(ex: Exchange) -> None:
        if len(ex.bodies) == 3:
            ex.disconnect.set()

    ex = Exchange("/v1/completions", {"model": BASE, "prompt": "Hi", "max_tokens": 50, "stream": True},
                  on_body=hang_up_after_three)  # fmt: skip
    run(client.app, ex)  # returns normally: the response ends with the client
    (call,) = engine.calls
    request_id = call[3]
    assert request_id in engine.aborted
    assert engine.active == {} and client.app.state.lifecycle.tickets == {}
    assert 3 <= len(ex.bodies) <= 4  # at most the write already under way
    assert not any(m.get("more_body") is False for m in ex.messages)  # never completed


def test_cancelled_request_task_stops_the_writer_and_cleans_up(tokenizer):
    client, engine = make_client(tokenizer)
    engine.step_s = 0.01

    async def main() -> Exchange:
        ex = Exchange("/v1/completions", {"model": BASE, "prompt": "Hi", "max_tokens": 50, "stream": True})
        task = asyncio.create_task(client.app(ex.scope, ex.receive, ex.send))
        while len(ex.bodies) < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        written = len(ex.bodies)
        await asyncio.sleep(0.05)  # several engine steps: nothing more may be written
        assert len(ex.bodies) == written
        return ex

    asyncio.run(main())
    assert engine.calls[0][3] in engine.aborted
    assert engine.active == {} and client.app.state.lifecycle.tickets == {}


def test_send_failure_propagates_after_cleanup(tokenizer):
    client, engine = make_client(tokenizer)

    def fail_on_third(ex: Exchange) -> None:
        if len(ex.bodies) == 3:
            raise RuntimeError("socket gone")

    ex = Exchange("/v1/completions", {"model": BASE, "prompt": "Hi", "max_tokens": 20, "stream": True},
                  on_body=fail_on_third)  # fmt: skip
    with pytest.raises(RuntimeError, match="socket gone"):
        run(client.app, ex)
    assert engine.calls[0][3] in engine.aborted
    assert engine.active == {} and client.app.state.lifecycle.tickets == {}


def test_an_engine_failure_mid_stream_ends_with_an_error_event_and_done(tokenizer):
    client, engine = make_client(tokenizer)
    generate = engine.generate

    async def failing(*args, **kwargs):
        async for i, out in aenumerate(generate(*args, **kwargs)):
            if i == 2:
                raise RuntimeError("engine step failed")
            yield out

    engine.generate = failing
    options = {"include_usage": True, "continuous_usage_stats": True}
    ex = Exchange("/v1/chat/completions", chat(10, stream_options=options))
    run(client.app, ex)
    *deltas, end = ex.bodies
    assert len(deltas) == 3  # the role chunk and two engine outputs
    assert all("usage" in json.loads(e) for b in deltas for e in ex.events(b))
    error, done = ex.events(end)  # written together, as they are: no usage in the error event
    assert set(json.loads(error)) == {"error"} and "engine step failed" in error and done == "[DONE]"
    assert engine.active == {} and client.app.state.lifecycle.tickets == {}


async def aenumerate(stream: Any) -> Any:
    i = 0
    async for item in stream:
        yield i, item
        i += 1


@pytest.mark.parametrize("gather", [True, False])
def test_a_burst_at_an_idle_engine_is_submitted_together(tokenizer, monkeypatch, gather):
    """Requests that arrive together at an idle server reach the engine together: the first that is ready
    waits (``Arrivals``) until the ones received behind it are ready too. Without that (``gather=False``,
    GATHER_MAX_S 0) the first is submitted while the rest are still being parsed: the engine would start its
    first step with it alone."""
    import blora.server.serving as serving

    if not gather:
        monkeypatch.setattr(serving, "GATHER_MAX_S", 0.0)
        monkeypatch.setattr(serving, "GATHER_TURNS", 0)
    client, engine = make_client(tokenizer, max_num_seqs=8, max_queue=8)
    arrivals = client.app.state.serving.arrivals
    entered, seen = [], []
    enter = arrivals.enter
    monkeypatch.setattr(arrivals, "enter", lambda: entered.append(1) or enter())
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **k: seen.append(len(entered)) or generate(*a, **k))
    exchanges = [Exchange("/v1/chat/completions", chat(2)) for _ in range(6)]

    async def burst():  # one request received per event-loop turn, as a server reads a burst's connections
        tasks = []
        for ex in exchanges:
            tasks.append(asyncio.create_task(client.app(ex.scope, ex.receive, ex.send)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)

    asyncio.run(burst())
    assert all(ex.messages[0]["status"] == 200 for ex in exchanges)
    assert arrivals.pending == 0 and client.app.state.lifecycle.tickets == {}
    if gather:
        assert seen == [6] * 6, seen  # every submission after the whole burst was in
    else:
        assert seen[0] < 6, seen


def test_a_request_that_fails_before_submission_does_not_hold_the_burst(tokenizer):
    """A request refused while being prepared counts as ready (the middleware's ``finally``): the one waiting
    for it goes on without the full GATHER_MAX_S."""
    client, engine = make_client(tokenizer, max_num_seqs=8, max_queue=8)
    bad = Exchange("/v1/chat/completions", {**chat(2), "temperature": -1})
    good = Exchange("/v1/chat/completions", chat(2))

    async def burst():
        await asyncio.gather(*(client.app(ex.scope, ex.receive, ex.send) for ex in (good, bad)))

    asyncio.run(burst())
    assert good.messages[0]["status"] == 200 and bad.messages[0]["status"] == 400
    assert client.app.state.serving.arrivals.pending == 0
