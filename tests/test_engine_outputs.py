"""The engine emits each request's increment once: every output's ``delta_*`` fields are exactly what is new
since that request's previous output, they add up to the final cumulative fields, ``finished`` comes on
the last output only, emitted outputs are snapshots (later steps do not change them), ``FINAL_ONLY``
requests get only their final output, and each chunk of the plan carries its adapter's slot."""

from __future__ import annotations

import dataclasses

import pytest

from blora.engine import LLM, RequestOutput, RequestOutputKind, SamplingParams
from tests.helpers import make_adapter, targets, tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPTS = ["The history of the city begins", "Hi", "x" * 30, "Why is the sky"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    base = tiny_model("llama")
    path = make_adapter(
        base, tmp_path_factory.mktemp("adapter") / "a", seed=0, r=4, target_modules=targets("llama", "all")
    )
    # a tiny KV cache (12 blocks of 4 tokens) so that requests are preempted and recomputed mid-stream
    return LLM(
        base, tokenizer=tokenizer(), adapters={"a": str(path)}, block_size=4, num_kv_blocks=12,
        max_num_batched_tokens=16, max_num_seqs=4,
    )  # fmt: skip


def params(stop: list[str] | None = None, **kw) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=14, seed=s, n=2, logprobs=2, stop=stop, **kw) for s in range(len(PROMPTS))
    ]


def run(llm: LLM, sampling: list[SamplingParams], kind: RequestOutputKind) -> dict[str, list[RequestOutput]]:
    """Every output the engine emits, per request, with a snapshot of its lengths taken when emitted."""
    engine = llm.engine
    ids = [
        engine.add_request(None, p, sp, adapter, output_kind=kind)
        for p, sp, adapter in zip(PROMPTS, sampling, ["a", None, "a", None], strict=True)
    ]
    emitted: dict[str, list[RequestOutput]] = {i: [] for i in ids}
    preemptions = engine.stats()["num_preemptions_total"]
    while engine.has_unfinished_requests():
        for out in engine.step():
            snapshot = [(len(c.text), len(c.token_ids), len(c.logprobs or [])) for c in out.outputs]
            emitted[out.request_id].append(out)
            out._snapshot = snapshot  # type: ignore[attr-defined]
    assert engine.stats()["num_preemptions_total"] > preemptions, "the KV cache must be tight enough"
    return emitted


def stop_strings(llm: LLM) -> list[str]:
    """A stop string that really occurs in a generated text (taken from a run without stops)."""
    out = llm.generate(PROMPTS[0], params()[0])[0].outputs[0]
    assert len(out.text) > 12, "the tiny model must generate some text"
    return [out.text[6:9]]


@pytest.mark.parametrize("with_stop", [False, True])
def test_deltas_are_each_increment_once_and_add_up(llm, with_stop):
    stop = stop_strings(llm) if with_stop else None
    emitted = run(llm, params(stop), RequestOutputKind.CUMULATIVE)
    for outs in emitted.values():
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        for index in range(2):
            text, ids, logprobs = "", [], []
            for out in outs:
                c = out.outputs[index]
                assert c.text == text + c.delta_text  # the delta is exactly the new part
                assert c.token_ids == ids + c.delta_token_ids
                assert c.logprobs == logprobs + c.delta_logprobs
                text, ids, logprobs = c.text, c.token_ids, c.logprobs
            final = outs[-1].outputs[index]
            assert final.finish_reason in ("stop", "length") and len(final.token_ids) > 0
            if with_stop:
                assert stop[0] not in final.text
        for out in outs:  # emitted outputs are snapshots: later steps did not grow them
            now = [(len(c.text), len(c.token_ids), len(c.logprobs or [])) for c in out.outputs]
            assert now == out._snapshot
    if with_stop:
        reasons = [o.outputs[i].stop_reason for outs in emitted.values() for o in outs[-1:] for i in range(2)]
        assert stop[0] in reasons, "the stop string must end at least one completion"


def test_stream_interval_sends_the_first_token_then_every_n_and_the_same_completions(llm, monkeypatch):
    stop = stop_strings(llm)
    llm.reset_prefix_cache()  # both runs compute their prompts: the same arithmetic, the same logprobs
    every = run(llm, params(stop), RequestOutputKind.CUMULATIVE)
    monkeypatch.setattr(llm.engine, "config", dataclasses.replace(llm.engine.config, stream_interval=4))
    llm.reset_prefix_cache()
    grouped = run(llm, params(stop), RequestOutputKind.CUMULATIVE)
    for one, four in zip(every.values(), grouped.values(), strict=True):
        for a, b in zip(one[-1].outputs, four[-1].outputs, strict=True):
            assert (b.text, b.token_ids, b.logprobs, b.finish_reason, b.stop_reason) == (
                a.text, a.token_ids, a.logprobs, a.finish_reason, a.stop_reason,
            )  # fmt: skip
        for out in four[:-1]:  # each output: some choice's first token (not held back), or >= 4 new ones
            firsts = [c for c in out.outputs if c.delta_token_ids and c.delta_token_ids == c.token_ids]
            assert all(len(c.token_ids) == 1 for c in firsts)
            assert firsts or max(len(c.delta_token_ids) for c in out.outputs) >= 4, out.outputs
        assert len(four) < len(one)
        for index in range(2):  # the deltas still add up to the completion
            c = four[-1].outputs[index]
            assert "".join(o.outputs[index].delta_text for o in four) == c.text
            assert [t for o in four for t in o.outputs[index].delta_token_ids] == c.token_ids


def test_stream_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="stream_interval must be >= 1"):
        LLM(tiny_model("llama"), tokenizer=tokenizer(), stream_interval=0)


def test_final_only_emits_the_final_output_alone(llm):
    stop = stop_strings(llm)
    cumulative = run(llm, params(stop), RequestOutputKind.CUMULATIVE)
    final_only = run(llm, params(stop), RequestOutputKind.FINAL_ONLY)
    for streamed, alone in zip(cumulative.values(), final_only.values(), strict=True):
        assert len(alone) == 1 and alone[0].finished
        for a, b in zip(streamed[-1].outputs, alone[0].outputs, strict=True):
            assert (b.text, b.token_ids, b.logprobs, b.finish_reason) == (
                a.text,
                a.token_ids,
                a.logprobs,
                a.finish_reason,
            )
            assert (b.delta_text, b.delta_token_ids, b.delta_logprobs) == (b.text, b.token_ids, b.logprobs)
    # LLM.generate asks for the final outputs only, and returns the same completions
    generated = llm.generate(PROMPTS, params(stop), adapters=["a", None, "a", None])
    assert [[c.token_ids for c in o.outputs] for o in generated] == [
        [c.token_ids for c in outs[-1].outputs] for outs in cumulative.values()
    ]


def test_output_is_a_snapshot_and_the_increment_is_taken_once(llm):
    engine = llm.engine
    rid = engine.add_request(None, PROMPTS[0], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs: list[RequestOutput] = []
    while len(outs) < 2:
        outs += [o for o in engine.step() if o.request_id == rid]
    seq = engine.requests[rid].seqs[0]
    first, again = seq.output(), seq.output()  # reading changes nothing
    assert first == again and first.delta_token_ids == [] and first.token_ids == seq.output_token_ids
    assert outs[0].outputs[0].delta_token_ids == outs[0].outputs[0].token_ids  # the first output: all so far
    assert (
        outs[1].outputs[0].delta_token_ids
        == outs[1].outputs[0].token_ids[len(outs[0].outputs[0].token_ids) :]
    )
    assert engine.requests[rid].take_output().outputs[0].delta_token_ids == []  # already emitted once
    engine.abort_request(rid, quiet=True)


def test_abort_releases_held_back_text_in_its_final_output(llm):
    engine = llm.engine
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    text = llm.generate(PROMPTS[0], greedy)[0].outputs[0].text
    stop = text[4:6] + "\x00never"  # starts like the text, never completes: a matching tail is held back
    rid = engine.add_request(
        None, PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=[stop])
    )
    streamed = ""
    while len(engine.requests[rid].seqs[0].output_token_ids) < 8:
        streamed += "".join(o.outputs[0].delta_text for o in engine.step() if o.request_id == rid)
    assert engine.abort_request(rid)
    final = [o for o in engine.step() if o.request_id == rid]
    assert len(final) == 1 and final[0].finished and final[0].outputs[0].finish_reason == "abort"
    assert (
        streamed + final[0].outputs[0].delta_text
        == final[0].outputs[0].text
        == text[: len(final[0].outputs[0].text)]
    )


def test_plan_carries_each_chunks_adapter_slot(llm, monkeypatch):
    engine = llm.engine
    seen: list[tuple[str | None, int]] = []
    execute = engine.runner.execute

    def spy(scheduled):
        seen.extend((s.seq.adapter, s.slot) for s in scheduled)
        return execute(scheduled)

    monkeypatch.setattr(engine.runner, "execute", spy)
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=3), adapters=["a", None])
    assert {adapter for adapter, _ in seen} == {"a", None}
    assert all(slot == (-1 if adapter is None else engine.store.slot(adapter)) for adapter, slot in seen)
    assert all(slot >= 0 for adapter, slot in seen if adapter is not None)
