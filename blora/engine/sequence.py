"""Request and sequence state: tokens, progress through the KV cache, sampling state, output text."""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field

import torch

from blora.engine.detokenizer import IncrementalDetokenizer
from blora.engine.outputs import CompletionOutput, PromptLogprobs, RequestMetrics, RequestOutput
from blora.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion being generated. ``token_ids`` = prompt + generated so far; the first
    ``num_computed_tokens`` of them have K/V in the cache (blocks in ``block_table``)."""

    seq_id: int
    request: Request
    index: int
    token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    cache_identity: str | None = None  # adapter part of its prefix-cache keys; set when first scheduled
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks, in order
    num_cached_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: PromptLogprobs | None = None  # the request's first sequence, with prompt_logprobs=k
    num_preemptions: int = 0
    sent_text_len: int = 0
    sent_num_tokens: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def adapter(self) -> str | None:
        return self.request.adapter

    @property
    def order(self) -> tuple[int, int]:
        """FIFO priority: earlier requests first, then completion index."""
        return (self.request.order, self.index)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_full_prompt(self) -> bool:
        """Its prompt logprobs are not all computed yet: it must compute its whole prompt (no cached blocks)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def prompt_logprob_span(self, start: int, num_tokens: int) -> range:
        """Positions of the chunk ``[start, start + num_tokens)`` whose logits give a prompt logprob not yet
        held (position p gives prompt token p + 1's)."""
        if not self.needs_full_prompt:
            return range(0)
        return range(
            max(start, len(self.prompt_logprobs) - 1), min(start + num_tokens, self.num_prompt_tokens - 1)
        )

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def output(self) -> CompletionOutput:
        """The completion so far plus the delta since the previous call."""
        detok = self.detokenizer
        text = detok.text[: detok.safe_length(self.is_finished)]
        out_ids = self.output_token_ids
        delta_ids = out_ids[self.sent_num_tokens :]
        delta_logprobs = None if self.logprobs is None else self.logprobs[self.sent_num_tokens :]
        delta_text = text[self.sent_text_len :] if len(text) >= self.sent_text_len else ""
        self.sent_text_len = max(self.sent_text_len, len(text))
        self.sent_num_tokens = len(out_ids)
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=list(out_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            cumulative_logprob=self.cumulative_logprob,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            delta_logprobs=delta_logprobs,
        )


@dataclass(eq=False)
class Request:
    """A user request: one prompt, one adapter (or None), ``params.n`` sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None
    order: int
    max_tokens: int
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    seqs: list[Sequence] = field(default_factory=list)
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[seq.output() for seq in self.seqs],
            finished=self.finished,
            adapter=self.adapter,
            metrics=dataclasses.replace(self.metrics),
            error=self.error,
            prompt_logprobs=self._prompt_logprobs(),
        )

    def _prompt_logprobs(self) -> PromptLogprobs | None:
        held = self.seqs[0].prompt_logprobs if self.seqs else None
        return list(held) if held is not None and len(held) == len(self.prompt_token_ids) else None
