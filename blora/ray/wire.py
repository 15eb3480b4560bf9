"""Engine outputs over the wire: each ``RequestOutput`` carries everything generated so far, so sending it
whole every step costs O(length) per token, O(length²) per request. The replica sends what is new instead
(``pack``) and the ingress rebuilds the full output (``unpack``), exactly: a step whose output is not its
predecessor plus its deltas (never seen, but not assumed) is sent whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from blora.engine.outputs import CompletionOutput, RequestOutput


@dataclass
class _Seen:
    """What the other side already has of one completion."""

    text: str
    num_tokens: int
    num_logprobs: int | None


@dataclass
class Packed:
    """A ``RequestOutput`` whose completions flagged in ``deltas_only`` hold only their deltas (``text``,
    ``token_ids`` and ``logprobs`` empty) and whose ``prompt_token_ids`` is empty unless ``has_prompt``."""

    output: RequestOutput
    has_prompt: bool
    deltas_only: list[bool]


def _extends(c: CompletionOutput, seen: _Seen | None) -> bool:
    if seen is None or c.text != seen.text + c.delta_text:
        return False
    delta = c.delta_token_ids
    if len(c.token_ids) != seen.num_tokens + len(delta) or c.token_ids[seen.num_tokens :] != delta:
        return False
    if c.logprobs is None or seen.num_logprobs is None:
        return c.logprobs is None and seen.num_logprobs is None
    new = c.delta_logprobs or []
    return len(c.logprobs) == seen.num_logprobs + len(new) and c.logprobs[seen.num_logprobs :] == new


class Packer:
    """Replica side, one per request."""

    def __init__(self) -> None:
        self._seen: dict[int, _Seen] = {}
        self._sent_prompt = False

    def pack(self, out: RequestOutput) -> Packed:
        flags, outputs = [], []
        for c in out.outputs:
            only_deltas = _extends(c, self._seen.get(c.index))
            flags.append(only_deltas)
            nlp = None if c.logprobs is None else len(c.logprobs)
            self._seen[c.index] = _Seen(c.text, len(c.token_ids), nlp)
            outputs.append(dataclasses.replace(c, text="", token_ids=[], logprobs=None) if only_deltas else c)
        has_prompt = not self._sent_prompt
        self._sent_prompt = True
        slim = dataclasses.replace(
            out, outputs=outputs, prompt_token_ids=out.prompt_token_ids if has_prompt else []
        )
        return Packed(slim, has_prompt, flags)


class Unpacker:
    """Ingress side, one per request: the inverse of ``Packer``."""

    def __init__(self) -> None:
        self._last: dict[int, CompletionOutput] = {}
        self._prompt: list[int] = []
        self.last: RequestOutput | None = None  # the latest rebuilt output

    def unpack(self, packed: Packed) -> RequestOutput:
        out = packed.output
        if packed.has_prompt:
            self._prompt = out.prompt_token_ids
        outputs = []
        for c, only_deltas in zip(out.outputs, packed.deltas_only, strict=True):
            if only_deltas:
                prev = self._last[c.index]
                logprobs = None
                if prev.logprobs is not None:
                    logprobs = prev.logprobs + (c.delta_logprobs or [])
                c = dataclasses.replace(
                    c,
                    text=prev.text + c.delta_text,
                    token_ids=prev.token_ids + c.delta_token_ids,
                    logprobs=logprobs,
                )
            self._last[c.index] = c
            outputs.append(c)
        self.last = dataclasses.replace(out, outputs=outputs, prompt_token_ids=self._prompt)
        return self.last
