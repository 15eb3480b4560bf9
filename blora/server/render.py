"""Turn engine outputs into OpenAI response objects: choices, stream chunks, logprobs, usage.

Streams carry the engine's increments as they are: each engine output's ``delta_text`` /
``delta_token_ids`` / ``delta_logprobs`` is exactly what is new since that request's previous output (the
first one: everything so far), so every output of a request must reach ``StreamState.deltas`` in order;
nothing is re-diffed against the cumulative ``text`` / ``token_ids``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # json.dumps(str, ensure_ascii=False) without the encoder object
from typing import Any

from blora.server.protocol import (
    ChatLogProb,
    ChatLogProbs,
    ChatMessageOut,
    CompletionLogProbs,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCallOut,
    TopLogProb,
    UsageInfo,
)
from blora.server.tools import ToolPlan, call_id, held_back, parse_output

LOW_LOGPROB = -9999.0  # what OpenAI reports for a token whose logprob the engine did not return


class TokenText:
    """Per-token strings for logprobs (decoded one token at a time, like OpenAI and vLLM)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._cache) < 100_000:
                self._cache[token_id] = text
        return text


def _top(entry: dict[int, float] | None, k: int) -> list[tuple[int, float]]:
    if not entry or k <= 0:
        return []
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def _chosen(entry: dict[int, float] | None, token_id: int) -> float:
    if entry and token_id in entry:
        return float(entry[token_id])
    return LOW_LOGPROB


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, float]], k: int, text: TokenText, offset: int
) -> CompletionLogProbs:
    """Legacy completions logprobs for ``token_ids``; ``offset`` is the text offset of the first one."""
    out = CompletionLogProbs()
    for tid, entry in zip(token_ids, entries, strict=False):
        token = text(tid)
        out.tokens.append(token)
        out.token_logprobs.append(_chosen(entry, tid))
        out.text_offset.append(offset)
        out.top_logprobs.append({text(t): float(lp) for t, lp in _top(entry, k)} if k > 0 else None)
        offset += len(token)
    return out


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, float]], k: int, text: TokenText
) -> ChatLogProbs:
    content = []
    for tid, entry in zip(token_ids, entries, strict=False):
        token = text(tid)
        top = [
            TopLogProb(token=text(t), logprob=float(lp), bytes=list(text(t).encode()))
            for t, lp in _top(entry, k)
        ]
        content.append(
            ChatLogProb(
                token=token, logprob=_chosen(entry, tid), bytes=list(token.encode()), top_logprobs=top
            )
        )
    return ChatLogProbs(content=content)


@dataclass
class ChoiceState:
    """What one choice (one engine sequence) has sent to the client."""

    text_offset: int = 0  # characters of generated text sent (legacy completions logprobs offsets)
    finished: bool = False
    started: bool = False


@dataclass
class Delta:
    """One choice's increment from one engine output; ``first``: the choice's first increment."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]]
    finish_reason: str | None
    first: bool


@dataclass
class StreamState:
    """Per-choice streaming state of one response; ``choice index = prompt index * n + output index``."""

    n: int
    states: dict[int, ChoiceState] = field(default_factory=dict)

    def deltas(self, prompt_index: int, output: Any) -> list[Delta]:
        """The increments of ``output`` (the engine's own ``delta_*``), one per choice not yet finished."""
        result = []
        for comp in output.outputs:
            index = prompt_index * self.n + comp.index
            st = self.states.get(index)
            if st is None:
                st = self.states[index] = ChoiceState()
            if st.finished:
                continue
            finish = comp.finish_reason or ("stop" if output.finished else None)
            lps = comp.delta_logprobs or []
            result.append(Delta(index, comp.delta_text, comp.delta_token_ids, lps, finish, not st.started))
            st.started, st.finished = True, finish is not None
        return result


PLACEHOLDER = "\x00blora-text\x00"  # no generated text holds NUL: the tokenizers never decode to it


@dataclass(frozen=True)
class TextChunk:
    """The SSE line of a stream's plain text chunk (one choice, text only), rendered once by pydantic with
    a placeholder and then filled per token with the JSON string of the text: the same line as building
    and serializing the chunk model per token, at a twentieth of its cost (measured: ~2 vs ~50 us)."""

    head: str
    tail: str

    @classmethod
    def of(cls, render: Callable[[str], str]) -> TextChunk | None:
        """``render(text)`` -> SSE line; None if the placeholder does not appear exactly once."""
        line, marker = render(PLACEHOLDER), json.dumps(PLACEHOLDER)
        if line.count(marker) != 1:
            return None
        head, _, tail = line.partition(marker)
        return cls(head, tail)

    def fill(self, text: str) -> str:
        return self.head + encode_basestring(text) + self.tail


class TextChunks:
    """A stream's plain text chunks: ``render(index, text)`` -> SSE line, through a ``TextChunk`` per choice."""

    def __init__(self, render: Callable[[int, str], str]) -> None:
        self.render = render
        self._templates: dict[int, TextChunk | None] = {}

    def __call__(self, index: int, text: str) -> str:
        if index not in self._templates:
            self._templates[index] = TextChunk.of(lambda t: self.render(index, t))
        template = self._templates[index]
        return template.fill(text) if template is not None else self.render(index, text)


def usage_of(finals: list[Any]) -> UsageInfo:
    """Usage of finished engine outputs (one per prompt): the prompt counts once however large ``n``."""
    prompt = sum(len(out.prompt_token_ids or []) for out in finals)
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _finish(plan: ToolPlan, calls: list, finish: str) -> str:
    """OpenAI's finish_reason: "tool_calls" when the model chose to call (a named choice keeps "stop")."""
    return "tool_calls" if calls and plan.mode in ("auto", "required") and finish == "stop" else finish


def tool_message(plan: ToolPlan, text: str, finish: str) -> tuple[ChatMessageOut, str]:
    """The assistant message and finish_reason of a finished output under ``plan``."""
    if not plan.active:
        return ChatMessageOut(content=text), finish
    parsed = parse_output(plan, text)
    calls = [ToolCallOut(id=call_id(), function=FunctionCall(name=n, arguments=a)) for n, a in parsed.calls]
    return ChatMessageOut(content=parsed.content, tool_calls=calls), _finish(plan, calls, finish)


@dataclass
class ToolStream:
    """Streaming deltas of one choice under a tool plan (OpenAI's ``delta.tool_calls`` shape).

    ``named``: the arguments stream as they are generated (the first delta carries the call's id and name).
    ``required``: the calls are sent whole when the output ends (the JSON array must be complete to split).
    ``auto``: content streams up to a ``<tool_call>`` tag (or a tail that may start one); the rest is held
    and sent at the end as tool calls, or as content if it holds none.
    """

    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of ``text`` sent as content (auto) or arguments (named)
    call: str | None = None  # the named call's id once announced

    def feed(self, delta: str, finish: str | None) -> tuple[list[DeltaMessage], str | None]:
        """(deltas to send, finish_reason) for the next piece of text."""
        self.text += delta
        if self.plan.mode == "named":
            return self._named(delta), finish
        if finish is None:
            if self.plan.mode == "auto":
                return self._content(held_back(self.text)), None
            return [], None
        parsed = parse_output(self.plan, self.text)
        if not parsed.calls:
            return self._content(len(self.text)), finish
        calls = [
            DeltaToolCall(
                index=i, id=call_id(), type="function", function=DeltaFunctionCall(name=name, arguments=args)
            )
            for i, (name, args) in enumerate(parsed.calls)
        ]
        return [DeltaMessage(tool_calls=calls)], _finish(self.plan, calls, finish)

    def _content(self, upto: int) -> list[DeltaMessage]:
        piece, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return [DeltaMessage(content=piece)] if piece else []

    def _named(self, delta: str) -> list[DeltaMessage]:
        if self.call is None:
            self.call = call_id()
            fn = DeltaFunctionCall(name=self.plan.named, arguments=delta)
            return [
                DeltaMessage(tool_calls=[DeltaToolCall(index=0, id=self.call, type="function", function=fn)])
            ]
        if not delta:
            return []
        return [
            DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta))])
        ]
