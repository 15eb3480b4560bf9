"""Engine outputs over the wire: the replica sends each ``RequestOutput``'s increments as they are, and the
ingress rebuilds the cumulative view.

The engine's ``delta_text`` / ``delta_token_ids`` / ``delta_logprobs`` are exactly what is new since the
request's previous output (the first output: everything so far), so the replica (``Packer``) drops the
cumulative ``text`` / ``token_ids`` / ``logprobs``, and sends the prompt's token ids and prompt logprobs
once; per token the wire carries O(1), not O(length). The ingress (``Unpacker``) appends the increments to
what it has, so the server sees the outputs ``AsyncLLM`` would have given it. Every packed output of a
request must be unpacked, in order (Ray's streaming responses deliver them so).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from blora.engine.outputs import CompletionOutput, PromptLogprobs, RequestOutput


@dataclass
class Packed:
    """A ``RequestOutput`` whose completions hold only their increments (``text``, ``token_ids`` empty,
    ``logprobs`` None), whose ``prompt_token_ids`` is empty unless ``has_prompt`` and whose
    ``prompt_logprobs`` is None unless ``has_prompt_logprobs``."""

    output: RequestOutput
    has_prompt: bool
    has_prompt_logprobs: bool


class Packer:
    """Replica side, one per request."""

    def __init__(self) -> None:
        self._sent_prompt = False
        self._sent_prompt_logprobs = False

    def pack(self, out: RequestOutput) -> Packed:
        outputs = [dataclasses.replace(c, text="", token_ids=[], logprobs=None) for c in out.outputs]
        has_prompt = not self._sent_prompt
        has_prompt_logprobs = out.prompt_logprobs is not None and not self._sent_prompt_logprobs
        self._sent_prompt = True
        self._sent_prompt_logprobs = self._sent_prompt_logprobs or has_prompt_logprobs
        slim = dataclasses.replace(
            out,
            outputs=outputs,
            prompt_token_ids=out.prompt_token_ids if has_prompt else [],
            prompt_logprobs=out.prompt_logprobs if has_prompt_logprobs else None,
        )
        return Packed(slim, has_prompt, has_prompt_logprobs)


class Unpacker:
    """Ingress side, one per request: the inverse of ``Packer``."""

    def __init__(self) -> None:
        self._last: dict[int, CompletionOutput] = {}
        self._prompt: list[int] = []
        self._prompt_logprobs: PromptLogprobs | None = None
        self.last: RequestOutput | None = None  # the latest rebuilt output

    def unpack(self, packed: Packed) -> RequestOutput:
        out = packed.output
        if packed.has_prompt:
            self._prompt = out.prompt_token_ids
        if packed.has_prompt_logprobs:
            self._prompt_logprobs = out.prompt_logprobs
        outputs = [self._rebuild(c) for c in out.outputs]
        self.last = dataclasses.replace(
            out, outputs=outputs, prompt_token_ids=self._prompt, prompt_logprobs=self._prompt_logprobs
        )
        return self.last

    def _rebuild(self, c: CompletionOutput) -> CompletionOutput:
        """``c`` with its cumulative fields: what came before plus its increments."""
        prev = self._last.get(c.index)
        text, token_ids = c.delta_text, list(c.delta_token_ids)
        logprobs = None if c.delta_logprobs is None else list(c.delta_logprobs)
        if prev is not None:
            text, token_ids = prev.text + text, prev.token_ids + token_ids
            if logprobs is not None:
                logprobs = (prev.logprobs or []) + logprobs
        c = dataclasses.replace(c, text=text, token_ids=token_ids, logprobs=logprobs)
        self._last[c.index] = c
        return c
