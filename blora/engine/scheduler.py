"""Decides, each step, which sequences run and on which tokens; knows nothing about tensors.

Policy (continuous batching with chunked prefill, like vLLM v1):
1. Running sequences first, decodes before prefill chunks, FIFO: each gets its remaining tokens (1 for a
   decode) up to the step's token budget. When a sequence needs a KV block and none is free, the
   latest-arrived running sequence is preempted: its blocks are freed and it goes back to waiting, to be
   recomputed from its prompt + generated tokens later (outputs are unchanged).
2. Then waiting sequences are admitted in FIFO order while the token budget, ``max_num_seqs`` and free
   blocks allow; a long prompt is cut into chunks over several steps.
3. At most ``max_loras`` distinct adapters are running at once. A waiting request whose adapter does not
   fit is skipped and later ones may pass it, but only for ``max_adapter_wait_steps`` steps: after that
   admission stops until its adapter fits, so it cannot starve.
4. Prefix caching (``BlockManager``): a sequence admitted without blocks first takes the cached blocks of
   its leading tokens (same tokens, same adapter identity) and computes only the rest; a cached block
   nobody uses costs a free block, one that running sequences share costs nothing.

The scheduler owns every sequence transition (like nano-vllm's ``Scheduler.postprocess``): admission,
preemption and status in ``schedule()``; after the step, ``update(plan, results)`` advances the computed
tokens, appends the sampled tokens and finishes sequences (stop / length); ``abort()`` ends one early.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blora.engine.block_manager import BlockManager
from blora.engine.sequence import Request, Sequence, SequenceStatus

if TYPE_CHECKING:  # results of the step; the scheduler reads their plain fields, never a tensor
    from blora.engine.sampler import PromptTopK, SampleResult


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_loras: int = 16
    max_adapter_wait_steps: int = 16

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_loras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class StopRules:
    """The model's limits every sequence is checked against when a token is appended."""

    eos_token_ids: set[int]
    max_model_len: int
    vocab_size: int


@dataclass
class ScheduledSeq:
    """``seq`` computes ``token_ids[start : start + num_tokens]`` this step, with the LoRA in device slot
    ``slot`` (-1: base model; the engine resolves it once the step's adapters are installed)."""

    seq: Sequence
    start: int
    num_tokens: int
    slot: int = -1

    @property
    def sample(self) -> bool:
        """The chunk reaches the sequence's last token, so this step yields its next token."""
        return self.start + self.num_tokens == len(self.seq.token_ids)


@dataclass
class SchedulePlan:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def adapters(self) -> set[str]:
        return {s.seq.adapter for s in self.scheduled if s.seq.adapter is not None}

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get their next token this step, in ``scheduled`` order (the logits' rows)."""
        return [s.seq for s in self.scheduled if s.sample]


@dataclass
class StepResults:
    """What running a plan produced: one ``SampleResult`` per ``plan.sampled`` sequence (in that order),
    the prompt logprobs computed (``PromptTopK``) and ``decode_each`` (token ids -> each one's text alone,
    for their entries)."""

    samples: list[SampleResult]
    prompt_logprobs: list[PromptTopK]
    decode_each: Callable[[list[int]], list[str]]


@dataclass
class StepUpdate:
    """What ``Scheduler.update`` changed: the requests that progressed (``finished`` says if they are done)
    and those whose update failed (request id -> (request, exception); they must be aborted), disjoint."""

    progressed: dict[str, Request] = field(default_factory=dict)
    failed: dict[str, tuple[Request, Exception]] = field(default_factory=dict)
    num_generated: int = 0  # tokens appended


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        stop: StopRules,
        can_admit: Callable[[Sequence], bool] | None = None,
        cache_identity: Callable[[str | None], str] | None = None,
    ) -> None:
        self.config = config
        self.blocks = block_manager
        self.stop = stop
        self.can_admit = can_admit  # False while a sequence's adapter is still loading
        # adapter name -> its identity in prefix-cache keys (with its weight version); by default the name
        self.cache_identity = cache_identity or (
            lambda adapter: "" if adapter is None else f"adapter:{adapter}"
        )
        self.waiting: list[Sequence] = []  # sorted by seq.order
        self.running: list[Sequence] = []  # sorted by seq.order
        self._adapter_waits: dict[int, int] = {}

    # -- queue maintenance -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.order)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        self._adapter_waits.pop(seq.seq_id, None)

    def abort(self, seq: Sequence) -> None:
        """End ``seq`` now (finish reason "abort") and free its blocks; nothing if it already finished."""
        if not seq.is_finished:
            self.remove(seq)
            seq.finish("abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def running_adapters(self) -> Counter:
        return Counter(s.adapter for s in self.running if s.adapter is not None)

    def waiting_adapters(self) -> Counter:
        return Counter(s.adapter for s in self.waiting if s.adapter is not None)

    # -- the plan ----------------------------------------------------------------------------------
    def schedule(self) -> SchedulePlan:
        plan = SchedulePlan()
        budget = self.config.max_num_batched_tokens
        # decodes (1 token left) before prefill chunks, FIFO within each
        for seq in sorted(self.running, key=lambda s: (s.num_uncomputed_tokens > 1, s.order)):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            if self._reserve(seq, seq.num_computed_tokens + n, plan):
                plan.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget = self.config.max_num_batched_tokens - plan.num_tokens  # preemption may refund
        self._admit(plan, budget)
        return plan

    def _reserve(self, seq: Sequence, num_tokens: int, plan: SchedulePlan) -> bool:
        """Make room for ``seq``'s first ``num_tokens`` tokens, preempting the latest arrivals if needed.
        False if ``seq`` itself had to be preempted."""
        while not self.blocks.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        self.blocks.allocate(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence, plan: SchedulePlan) -> None:
        self.running.remove(seq)
        plan.scheduled = [s for s in plan.scheduled if s.seq is not seq]
        plan.preempted.append(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0  # recomputed from its prompt + generated tokens when admitted again
        seq.num_preemptions += 1
        self.add(seq)

    def _admit(self, plan: SchedulePlan, budget: int) -> None:
        active = set(self.running_adapters())
        preempted = {id(s) for s in plan.preempted}
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                return
            if id(seq) in preempted:
                return  # blocks just ran out; retry next step
            if seq.adapter is not None and self.can_admit is not None and not self.can_admit(seq):
                continue  # its adapter is still loading (prefetched); later requests may pass meanwhile
            if seq.adapter is not None and seq.adapter not in active and len(active) >= self.config.max_loras:
                waited = self._adapter_waits.get(seq.seq_id, 0) + 1
                self._adapter_waits[seq.seq_id] = waited
                if waited > self.config.max_adapter_wait_steps:
                    return  # let running adapters drain so this one fits
                continue
            if seq.cache_identity is None:  # first admission: the adapter's weights are ready now
                seq.cache_identity = self.cache_identity(seq.adapter)
            computed = self.blocks.computed_blocks(seq)
            if self.blocks.computing_next(seq, computed):
                continue  # a running sequence computes its next block now: admitted later, it shares it
            start = len(computed) * self.blocks.block_size
            n = min(len(seq.token_ids) - start, budget)
            if not self.blocks.can_allocate(seq, start + n, computed):
                return  # FIFO: later requests do not overtake on memory
            self.blocks.allocate(seq, start + n, computed)
            self.blocks.record_query(seq, computed)
            seq.num_computed_tokens = start  # the cached blocks hold its first tokens' K/V
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.order)
            self._adapter_waits.pop(seq.seq_id, None)
            plan.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
            if seq.adapter is not None:
                active.add(seq.adapter)

    # -- after the step ----------------------------------------------------------------------------
    def update(self, plan: SchedulePlan, results: StepResults) -> StepUpdate:
        """Apply a step's results: prompt logprobs, computed tokens (full blocks become shareable), then
        each sampled token (appended, checked against the stop rules; a finished sequence leaves). A
        sequence whose token cannot be appended (its sampling failed, its detokenization raised) fails its
        request alone: the request is reported in ``failed`` and its other sequences are not touched."""
        for prompt_logprobs in results.prompt_logprobs:
            prompt_logprobs.append_to_seq(results.decode_each)
        for s in plan.scheduled:
            s.seq.num_computed_tokens += s.num_tokens
            self.blocks.cache_blocks(s.seq)
        update = StepUpdate()
        for seq, res in zip(plan.sampled, results.samples, strict=True):
            req = seq.request
            if req.request_id in update.failed:
                continue
            try:
                self._append(seq, res, update)
            except Exception as exc:  # this request alone: its sampling or its token update failed
                update.failed[req.request_id] = (req, exc)
                update.progressed.pop(req.request_id, None)
                continue
            update.progressed[req.request_id] = req
        return update

    def _append(self, seq: Sequence, res: SampleResult, update: StepUpdate) -> None:
        """Append one sampled token to ``seq``; finish it if a stop rule says so."""
        if res.error is not None:
            raise res.error
        token, rules = res.token_id, self.stop
        if not 0 <= token < rules.vocab_size:
            raise RuntimeError(f"sampled token id {token} is outside the vocabulary [0, {rules.vocab_size})")
        update.num_generated += 1
        stop_string = seq.append_token(token, res.logprob, res.top_logprobs)
        params = seq.params
        if token in (params.stop_token_ids or ()):
            seq.finish("stop", token)
        elif not params.ignore_eos and token in rules.eos_token_ids:
            seq.finish("stop")
        elif stop_string is not None:
            seq.finish("stop", stop_string)
        elif seq.num_output_tokens >= seq.request.max_tokens or len(seq.token_ids) >= rules.max_model_len:
            seq.finish("length")
        if seq.is_finished:
            self.remove(seq)
