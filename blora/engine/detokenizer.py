"""Incremental detokenization with stop strings.

Decoding one token at a time is wrong for byte-level BPE (a multi-byte character spans tokens) and for
SentencePiece (a token's leading space depends on what precedes it). Like vLLM, each step decodes a short
window ``tokens[prefix_offset:]`` and the same window without the new tokens, and emits the difference
once it no longer ends in an incomplete character. The window starts in the prompt's tail so the first
generated token gets its leading space right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt tokens kept as decoding context for the first generated tokens.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text of one sequence's generated tokens, grown one token at a time, cut at the first stop string."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        stop_strings: tuple[str, ...] = (),
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        """``include_stop``: the text keeps the stop string that ended it; ``skip_special_tokens``: special
        tokens (EOS, chat markers) are left out of the text."""
        self.tokenizer = tokenizer
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""
        self.stop_strings = stop_strings
        self.max_stop_len = max((len(s) for s in stop_strings), default=0)

    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )
        return cast(str, text)  # one list of ids decodes to one string (the stub also covers batches)

    def add_token(self, token_id: int) -> str | None:
        """Append one generated token; returns the stop string that ended the text, if any."""
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None  # an incomplete multi-byte character: wait for the next token
        old_len = len(self.text)
        self.text += new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        return self._find_stop(old_len)

    def _find_stop(self, old_len: int) -> str | None:
        if not self.stop_strings:
            return None
        start = max(0, old_len - self.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop_strings:
            idx = self.text.find(stop, start)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        self.text = self.text[: best[0] + (len(best[1]) if self.include_stop else 0)]
        return best[1]

    def safe_length(self, finished: bool) -> int:
        """How much of ``text`` may be shown: all of it, except a tail that could start a stop string."""
        if finished or not self.stop_strings:
            return len(self.text)
        for k in range(min(self.max_stop_len - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(stop.startswith(tail) for stop in self.stop_strings):
                return len(self.text) - k
        return len(self.text)
