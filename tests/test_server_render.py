"""Streaming renderers: the engine's increments carried as they are, and the plain text chunk's template."""

from __future__ import annotations

import json

import pytest

from blora.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from blora.server.protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    DeltaMessage,
)
from blora.server.render import PLACEHOLDER, StreamState, TextChunk, TextChunks

TEXTS = [
    "",
    " hello",
    'quote " and \\ backslash / slash',
    "é ünï 😀 中文",
    "\n\t\r\b\f",
    "\x01\x1f\x7f",
    "\u2028\u2029",
]


def chat_line(index: int, text: str) -> str:
    chunk = ChatCompletionChunk(
        id="chatcmpl-1",
        created=7,
        model="m",
        choices=[ChatStreamChoice(index=index, delta=DeltaMessage(content=text))],
    )
    return f"data: {chunk.model_dump_json()}\n\n"


def completion_line(index: int, text: str) -> str:
    chunk = CompletionChunk(
        id="cmpl-1", created=7, model="m", choices=[CompletionChoice(index=index, text=text)]
    )
    return f"data: {chunk.model_dump_json()}\n\n"


@pytest.mark.parametrize("render", [chat_line, completion_line])
def test_text_chunk_is_the_line_pydantic_writes(render):
    chunks = TextChunks(render)
    for index in (0, 3):
        for text in TEXTS:
            line = chunks(index, text)
            assert line == render(index, text)
            assert json.loads(line[len("data: ") :])["choices"][0]["index"] == index


def test_text_chunk_refuses_a_line_without_exactly_one_placeholder():
    assert TextChunk.of(lambda t: f"data: {json.dumps([t, t])}\n\n") is None
    assert TextChunk.of(lambda t: "data: {}\n\n") is None
    chunks = TextChunks(lambda i, t: f"data: {json.dumps([i, t, t])}\n\n")  # falls back to rendering
    assert chunks(2, "x") == 'data: [2, "x", "x"]\n\n'
    assert PLACEHOLDER not in chunks(2, "x")


def output(finished: bool, *choices: tuple[int, str, list[int], str | None]) -> RequestOutput:
    outs = [
        CompletionOutput(i, "", [], finish_reason=fin, delta_text=t, delta_token_ids=ids)
        for i, t, ids, fin in choices
    ]
    return RequestOutput("r", None, [1, 2], outs, finished, None, RequestMetrics(0.0))


def test_stream_state_carries_the_increments_once_per_choice():
    state = StreamState(n=2)
    first = state.deltas(1, output(False, (0, "Hel", [5, 6], None), (1, "", [], None)))
    assert [(d.index, d.text, d.token_ids, d.first, d.finish_reason) for d in first] == [
        (2, "Hel", [5, 6], True, None),
        (3, "", [], True, None),
    ]
    second = state.deltas(1, output(False, (0, "lo", [7], "length"), (1, "Hi", [8], None)))
    assert [(d.index, d.text, d.first, d.finish_reason) for d in second] == [
        (2, "lo", False, "length"),
        (3, "Hi", False, None),
    ]
    # a finished choice is not sent again; the request's end finishes the rest ("stop" without a reason)
    last = state.deltas(1, output(True, (0, "", [], "length"), (1, "!", [9], None)))
    assert [(d.index, d.text, d.finish_reason) for d in last] == [(3, "!", "stop")]
    assert state.deltas(1, output(True, (0, "", [], "length"), (1, "", [], "stop"))) == []
