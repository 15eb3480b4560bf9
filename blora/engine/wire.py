"""Engine outputs over the wire: the engine's process (a Ray replica, ``blora serve``'s engine process) sends
each ``RequestOutput``'s increments as they are, and the receiving side rebuilds the cumulative view.

The engine's ``delta_text`` / ``delta_token_ids`` / ``delta_logprobs`` are exactly what is new since the
request's previous output (the first output: everything so far), so the sender (``Packer``) drops the
cumulative ``text`` / ``token_ids`` / ``logprobs``, and sends the request's id, prompt, prompt token ids and
prompt logprobs once; per token the wire carries O(1), not O(length), as plain tuples (what pickles
fastest: 2.2 us per output to pack and pickle and 3.1 us to unpickle and rebuild, against 6.9 and 8.5 us
with the outputs' dataclasses on the wire). The receiver (``Unpacker``) appends the increments to
what it has, so the server sees the outputs ``AsyncLLM`` would have given it. Every packed output of a
request must be unpacked, in order (Ray's streaming responses and the engine process's pipe deliver them
so).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from blora.engine.outputs import CompletionOutput, PromptLogprobs, RequestMetrics, RequestOutput

# A packed output: (finished, metrics, choices, head, prompt_logprobs, error) where
#   metrics: ``RequestMetrics``'s fields in order;
#   choices: per completion (index, delta_text, delta_token_ids, finish_reason, stop_reason, delta_logprobs,
#            cumulative_logprob);
#   head: (request_id, prompt, prompt_token_ids, adapter) in a request's first output, else None;
#   prompt_logprobs: in the first output that has them, else None.
Packed = tuple[bool, tuple, list[tuple], tuple | None, PromptLogprobs | None, Exception | None]

_METRICS = tuple(f.name for f in dataclasses.fields(RequestMetrics))


class Packer:
    """Sending side (the engine's process), one per request."""

    def __init__(self) -> None:
        self._sent_head = False
        self._sent_prompt_logprobs = False

    def pack(self, out: RequestOutput) -> Packed:
        head = None
        if not self._sent_head:
            head = (out.request_id, out.prompt, out.prompt_token_ids, out.adapter)
            self._sent_head = True
        prompt_logprobs = None
        if out.prompt_logprobs is not None and not self._sent_prompt_logprobs:
            prompt_logprobs = out.prompt_logprobs
            self._sent_prompt_logprobs = True
        metrics = out.metrics
        choices = [
            (c.index, c.delta_text, c.delta_token_ids, c.finish_reason, c.stop_reason, c.delta_logprobs,
             c.cumulative_logprob)
            for c in out.outputs
        ]  # fmt: skip
        return (
            out.finished,
            tuple(getattr(metrics, name) for name in _METRICS),
            choices,
            head,
            prompt_logprobs,
            out.error,
        )


class Unpacker:
    """Receiving side, one per request: the inverse of ``Packer``."""

    def __init__(self) -> None:
        self._last: dict[int, CompletionOutput] = {}
        self._head: tuple[str, Any, list[int], Any] = ("", None, [], None)
        self._prompt_logprobs: PromptLogprobs | None = None
        self.last: RequestOutput | None = None  # the latest rebuilt output

    def unpack(self, packed: Packed) -> RequestOutput:
        finished, metrics, choices, head, prompt_logprobs, error = packed
        if head is not None:
            self._head = head
        if prompt_logprobs is not None:
            self._prompt_logprobs = prompt_logprobs
        request_id, prompt, prompt_token_ids, adapter = self._head
        self.last = RequestOutput(
            request_id,
            prompt,
            prompt_token_ids,
            [self._rebuild(*choice) for choice in choices],
            finished,
            adapter,
            RequestMetrics(*metrics),
            error,
            self._prompt_logprobs,
        )
        return self.last

    def _rebuild(
        self,
        index,
        delta_text,
        delta_token_ids,
        finish_reason,
        stop_reason,
        delta_logprobs,
        cumulative_logprob,
    ) -> CompletionOutput:
        """The completion with its cumulative fields: what came before plus its increments."""
        prev = self._last.get(index)
        logprobs = None if delta_logprobs is None else list(delta_logprobs)
        if prev is None:
            text, token_ids = delta_text, list(delta_token_ids)
        else:
            text, token_ids = prev.text + delta_text, prev.token_ids + delta_token_ids
            if logprobs is not None:
                logprobs = (prev.logprobs or []) + logprobs
        c = CompletionOutput(
            index, text, token_ids, finish_reason, stop_reason, logprobs, cumulative_logprob, delta_text,
            delta_token_ids, delta_logprobs,
        )  # fmt: skip
        self._last[index] = c
        return c
