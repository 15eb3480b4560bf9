"""Request and sequence state: tokens, progress through the KV cache, sampling state, output text."""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field

import torch

from blora.engine.detokenizer import IncrementalDetokenizer
from blora.engine.outputs import (
    CompletionOutput,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    RequestOutputKind,
)
from blora.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Increment:
    """What one sequence produced since its request's previous emitted output: generated tokens, their
    logprobs (when the request asked for them) and the text that became safe to show, in pieces (joined
    once, when emitted)."""

    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)


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
    text_len: int = 0  # leading characters of detokenizer.text released as safe to show
    pending: Increment = field(default_factory=Increment)  # since the previous emitted output

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
        held = self.prompt_logprobs
        if held is None or len(held) >= self.num_prompt_tokens:
            return range(0)
        return range(max(start, len(held) - 1), min(start + num_tokens, self.num_prompt_tokens - 1))

    # -- transitions (called by the Scheduler) -------------------------------------------------------
    def append_token(
        self, token_id: int, logprob: float | None = None, top_logprobs: dict[int, float] | None = None
    ) -> str | None:
        """Append one generated token (with its logprobs when the request asked for them) and record it,
        and the text it made safe, in the increment. Returns the stop string its text completed, if any."""
        self.token_ids.append(token_id)
        self.pending.token_ids.append(token_id)
        if self.logprobs is not None:
            if top_logprobs is None or logprob is None or self.cumulative_logprob is None:
                raise RuntimeError(
                    f"the sampler gave no logprobs for token {token_id} of a request asking for them"
                )
            self.logprobs.append(top_logprobs)
            self.cumulative_logprob += logprob
            self.pending.logprobs.append(top_logprobs)
        stop_string = self.detokenizer.add_token(token_id)
        self._release_text()
        return stop_string

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        """End the sequence; the text held back in case it became a stop string is released."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self._release_text()

    def _release_text(self) -> None:
        """Record the detokenized text that became safe to show: all of it once finished, else all but a
        tail that may still become a stop string. Released text is never taken back (a stop string found
        later starts inside the held-back tail)."""
        safe = self.detokenizer.safe_length(self.is_finished)
        if safe > self.text_len:
            self.pending.text_parts.append(self.detokenizer.text[self.text_len : safe])
            self.text_len = safe

    # -- outputs -----------------------------------------------------------------------------------
    def take_increment(self) -> Increment:
        """What the sequence produced since the previous call (each increment is handed out once)."""
        increment, self.pending = self.pending, Increment()
        return increment

    def output(self, increment: Increment | None = None) -> CompletionOutput:
        """A snapshot of the completion so far (changes nothing); ``increment`` fills the ``delta_*``
        fields (empty when None)."""
        delta = increment if increment is not None else Increment()
        return CompletionOutput(
            index=self.index,
            text=self.detokenizer.text[: self.text_len],
            token_ids=self.output_token_ids,  # a new list (a slice)
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            cumulative_logprob=self.cumulative_logprob,
            delta_text="".join(delta.text_parts),
            delta_token_ids=delta.token_ids,
            delta_logprobs=None if self.logprobs is None else delta.logprobs,
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
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    @property
    def streams(self) -> bool:
        """Whether an output is emitted after every step that made progress (else only the final one)."""
        return self.output_kind is RequestOutputKind.CUMULATIVE

    def stream_due(self, interval: int) -> bool:
        """With a stream interval above 1: whether a streaming request's next output is due, i.e. one of its
        sequences holds ``interval`` unsent tokens, or its first tokens are not sent yet (the time to first
        token does not wait for the interval)."""
        first = False
        for seq in self.seqs:
            pending = len(seq.pending.token_ids)
            if pending >= interval:
                return True
            first = first or (pending > 0 and pending == seq.num_output_tokens)
        return first

    def take_output(self) -> RequestOutput:
        """The request's output now, each sequence's increment drained into its ``delta_*`` fields (the
        engine calls this once per emitted output, so each increment is emitted exactly once)."""
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[seq.output(seq.take_increment()) for seq in self.seqs],
            finished=self.finished,
            adapter=self.adapter,
            metrics=dataclasses.replace(self.metrics),
            error=self.error,
            prompt_logprobs=self._prompt_logprobs(),
        )

    def _prompt_logprobs(self) -> PromptLogprobs | None:
        held = self.seqs[0].prompt_logprobs if self.seqs else None
        return list(held) if held is not None and len(held) == len(self.prompt_token_ids) else None
