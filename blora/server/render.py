"""Turn engine outputs into OpenAI response objects: choices, stream chunks, logprobs, usage.

Deltas are computed from the cumulative ``text`` / ``token_ids`` of each engine output, so a consumer
that skips intermediate outputs (the engine may coalesce them) still streams every token exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blora.server.protocol import (
    ChatLogProb,
    ChatLogProbs,
    CompletionLogProbs,
    TopLogProb,
    UsageInfo,
)

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
    """How much of one choice (one engine sequence) has been sent to the client."""

    sent_chars: int = 0
    sent_tokens: int = 0
    text_offset: int = 0
    finished: bool = False
    started: bool = False


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]]
    finish_reason: str | None
    first: bool


@dataclass
class DeltaTracker:
    """Per-choice streaming state; ``choice index = prompt index * n + output index``."""

    n: int
    states: dict[int, ChoiceState] = field(default_factory=dict)

    def deltas(self, prompt_index: int, output: Any) -> list[Delta]:
        result = []
        for comp in output.outputs:
            index = prompt_index * self.n + comp.index
            st = self.states.setdefault(index, ChoiceState())
            if st.finished:
                continue
            text = comp.text[st.sent_chars :]
            ids = list(comp.token_ids[st.sent_tokens :])
            lps = list(comp.logprobs[st.sent_tokens :]) if comp.logprobs else []
            finish = comp.finish_reason or ("stop" if output.finished else None)
            result.append(Delta(index, text, ids, lps, finish, not st.started))
            st.started = True
            st.sent_chars, st.sent_tokens = len(comp.text), len(comp.token_ids)
            st.finished = finish is not None
        return result


def usage_of(finals: list[Any]) -> UsageInfo:
    """Usage of finished engine outputs (one per prompt): the prompt counts once however large ``n``."""
    prompt = sum(len(out.prompt_token_ids or []) for out in finals)
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
