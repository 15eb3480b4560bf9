"""Engine pieces without a model: block manager, scheduler policy, detokenizer, SamplingParams checks."""

from __future__ import annotations

import functools
import itertools

import pytest

from blora.engine.block_manager import BlockManager
from blora.engine.detokenizer import IncrementalDetokenizer
from blora.engine.sampler import SampleResult
from blora.engine.sampling_params import SamplingParams
from blora.engine.scheduler import Scheduler, SchedulerConfig, StepResults, StopRules
from blora.engine.sequence import Request, Sequence, SequenceStatus
from tests.helpers import tokenizer

_ids = itertools.count()
_tokenizer = functools.cache(tokenizer)


def make_seq(prompt_len: int, adapter: str | None = None, max_tokens: int = 4) -> Sequence:
    order = next(_ids)
    req = Request(
        str(order), None, [1] * prompt_len, SamplingParams(max_tokens=max_tokens), adapter, order, max_tokens
    )
    seq = Sequence(order, req, 0, [1] * prompt_len, IncrementalDetokenizer(_tokenizer(), [1] * prompt_len))
    req.seqs.append(seq)
    return seq


class Sim:
    """Drives a Scheduler like the engine does, with a fake model that always emits token 7."""

    def __init__(self, **config) -> None:
        blocks = config.pop("num_blocks", 64)
        # scheduler policy alone: the prompts here are all the same tokens, and no step registers its
        # blocks for sharing (tests/test_prefix_cache*.py cover prefix caching)
        self.blocks = BlockManager(blocks, config.pop("block_size", 4), enable_caching=False)
        self.sched = Scheduler(SchedulerConfig(**config), self.blocks, StopRules({2}, 10_000, 100))
        self.finished: list[Sequence] = []
        self.admitted: list[Sequence] = []

    def add(self, *seqs: Sequence) -> None:
        for seq in seqs:
            self.sched.add(seq)

    def step(self):
        plan = self.sched.schedule()
        for s in plan.scheduled:
            if s.seq not in self.admitted:
                self.admitted.append(s.seq)
        sampled = plan.sampled
        update = self.sched.update(plan, StepResults([SampleResult(7) for _ in sampled], [], lambda ids: []))
        assert not update.failed and update.num_generated == len(sampled)
        self.finished += [seq for seq in sampled if seq.is_finished]
        return plan

    def run(self, max_steps: int = 500) -> list:
        plans = []
        while self.sched.has_unfinished() and len(plans) < max_steps:
            plans.append(self.step())
        assert not self.sched.has_unfinished()
        return plans


def test_block_manager_accounting():
    bm = BlockManager(num_blocks=5, block_size=4)
    seq = make_seq(1)
    assert bm.blocks_needed(seq, 9) == 3
    bm.allocate(seq, 9)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 2
    assert bm.blocks_needed(seq, 12) == 0 and bm.blocks_needed(seq, 13) == 1
    assert not bm.can_allocate(seq, 21)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(seq, 21)
    bm.free(seq)
    assert bm.num_free_blocks == 5 and seq.block_table == [] and bm.usage == 0.0


def test_chunked_prefill_under_token_budget_and_decodes_first():
    sim = Sim(max_num_batched_tokens=32)
    short, long = make_seq(3, max_tokens=20), make_seq(100)
    sim.add(short, long)
    first = sim.step()
    assert [(s.seq, s.num_tokens) for s in first.scheduled] == [(short, 3), (long, 29)]
    second = sim.step()
    assert second.scheduled[0].seq is short and second.scheduled[0].num_tokens == 1  # decode first
    assert second.scheduled[1].num_tokens == 31
    for plan in sim.run():
        assert plan.num_tokens <= 32


def test_max_num_seqs():
    sim = Sim(max_num_seqs=2)
    sim.add(*[make_seq(5) for _ in range(5)])
    for plan in sim.run():
        assert len(plan.scheduled) <= 2


def test_adapter_cap_lets_others_pass_then_stops_for_fairness():
    sim = Sim(max_loras=2, max_adapter_wait_steps=3)
    a, b, c = make_seq(4, "A", max_tokens=8), make_seq(4, "B", max_tokens=8), make_seq(4, "C")
    a2, a3 = make_seq(4, "A"), make_seq(4, "A", max_tokens=2)
    sim.add(a, b, c, a2)
    plan = sim.step()
    assert [s.seq for s in plan.scheduled] == [a, b, a2]  # c does not fit, a2 (adapter A) passes it
    sim.step()
    sim.step()  # c has now been passed over 3 times
    sim.add(a3)
    sim.step()
    assert c.status is SequenceStatus.WAITING and a3.status is SequenceStatus.WAITING  # c waited > 3 steps
    plans = sim.run()
    for plan in plans:
        assert len(plan.adapters) <= 2
    assert sim.admitted.index(c) < sim.admitted.index(a3)


def test_preemption_frees_latest_arrival_and_recomputes():
    sim = Sim(num_blocks=6, block_size=4)
    first, second = make_seq(8, max_tokens=12), make_seq(8, max_tokens=12)
    sim.add(first, second)
    preempted = []
    while sim.sched.has_unfinished():
        plan = sim.step()
        preempted += plan.preempted
        assert sim.blocks.num_free_blocks >= 0
    assert preempted and set(preempted) == {second}
    assert second.num_preemptions >= 1
    assert len(first.output_token_ids) == len(second.output_token_ids) == 12
    assert sim.blocks.num_free_blocks == 6


def test_fifo_order_of_admission():
    sim = Sim(max_num_seqs=1)
    seqs = [make_seq(2, max_tokens=1) for _ in range(4)]
    sim.add(*reversed(seqs))  # insertion order does not matter, arrival order does
    sim.run()
    assert sim.finished == seqs


# -- detokenizer --------------------------------------------------------------------------------------


def stream_text(
    prompt: str, completion: str, stop: tuple[str, ...] = ()
) -> tuple[list[str], str, str | None]:
    """Feed ``completion``'s tokens one at a time; returns (emitted pieces, final text, stop hit)."""
    tok = tokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), stop)
    pieces, sent, hit = [], 0, None
    for token in tok.encode(completion):
        hit = detok.add_token(token)
        safe = detok.safe_length(finished=hit is not None)
        pieces.append(detok.text[sent:safe])
        sent = safe
        if hit is not None:
            break
    return pieces, detok.text, hit


def test_detokenizer_multibyte_and_spaces():
    completion = " héllo wörld 😀 中文字符 naïve — ok"
    pieces, text, _ = stream_text("Say:", completion)
    assert "".join(pieces) == text == completion
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[0].startswith(" ")  # the leading space of the first token survives


def test_detokenizer_stop_string_spanning_tokens_is_never_emitted():
    tok = tokenizer()
    completion = " The answer is 42.5 and more"
    assert len(tok.encode(" 42.5")) > 1  # the stop string spans several tokens
    pieces, text, hit = stream_text("Q:", completion, stop=("42.5",))
    assert hit == "42.5"
    assert text == " The answer is "
    assert "".join(pieces) == text
    assert not any("4" in p for p in pieces)  # no partial stop string leaked, even transiently


def test_detokenizer_stop_prefix_released_when_not_a_stop():
    pieces, text, hit = stream_text("Q:", " 42 is 4 and 2", stop=("42.5",))
    assert hit is None and text == " 42 is 4 and 2"
    assert "".join(pieces) == text  # the held-back "4"s were released once they could not start "42.5"


# -- SamplingParams validation ---------------------------------------------------------------------------

INVALID = [
    ("n", 0), ("n", 1.5), ("max_tokens", 0), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.1), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("seed", "1"), ("stop", [""]), ("stop", 3),
    ("stop_token_ids", [-1]), ("stop_token_ids", "2"), ("ignore_eos", "yes"), ("logprobs", -1),
    ("logprobs", 100),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_sampling_params_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_defaults_and_normalization():
    p = SamplingParams(stop="###", temperature=0, top_k=-1)
    assert p.stop_strings == ("###",) and p.greedy and not p.uses_filters and not p.uses_penalties
    assert SamplingParams(max_tokens=None).max_tokens is None
