"""AsyncLLM: concurrent streaming requests with adapters, aborts, adapter (un)loading while running,
validation errors, stats and graceful shutdown."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from blora.engine import LLM, AsyncLLM, SamplingParams
from tests.helpers import consume, make_adapter, targets, tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPTS = ["Hello", "The history of the city begins with a long story about", "x", "Why is the sky"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("async-adapters")
    base = tiny_model("llama")
    return {
        "one": str(make_adapter(base, root / "one", seed=1, r=4, target_modules=targets("llama", "attn"))),
        "two": str(make_adapter(base, root / "two", seed=2, r=8, target_modules=targets("llama", "mlp"))),
    }


def new_llm(adapters=None, **kw) -> AsyncLLM:
    return AsyncLLM(tiny_model("llama"), tokenizer=tokenizer(), adapters=adapters, block_size=4, **kw)


def test_concurrent_streams_match_offline_llm(adapters):
    names = [None, "one", "two", "one"]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    offline = LLM(tiny_model("llama"), tokenizer=tokenizer(), adapters=adapters, block_size=4)
    expected = offline.generate(PROMPTS, params, adapters=names)

    async def main():
        llm = new_llm(adapters)
        try:
            return await asyncio.gather(
                *(consume(llm, p, params, a) for p, a in zip(PROMPTS, names, strict=True))
            )
        finally:
            await llm.shutdown()

    for (last, text, ids, count), ref in zip(asyncio.run(main()), expected, strict=True):
        assert last.finished and count > 1  # streamed, not one final blob
        assert ids == last.outputs[0].token_ids == ref.outputs[0].token_ids
        assert text == last.outputs[0].text == ref.outputs[0].text
        assert last.metrics.first_token_time >= last.metrics.arrival_time
        assert last.metrics.finished_time >= last.metrics.first_token_time


def test_abort_and_early_close_free_blocks():
    async def main():
        llm = new_llm()
        try:
            params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
            gen = llm.generate(PROMPTS[1], params, request_id="a")
            await anext(gen)
            assert llm.stats()["kv_usage"] > 0
            assert await llm.abort("a")
            rest = [out async for out in gen]
            assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"

            gen = llm.generate(PROMPTS[1], params, request_id="b")
            await anext(gen)
            await gen.aclose()  # the client went away
            for _ in range(1000):  # up to 10 s on a loaded machine
                stats = llm.stats()
                if stats["num_running"] == 0 and stats["kv_usage"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert stats["num_running"] == 0 and stats["kv_usage"] == 0.0
            assert not await llm.abort("b")
        finally:
            await llm.shutdown()

    asyncio.run(main())


def test_invalid_requests_raise_value_error(adapters):
    async def main():
        llm = new_llm(adapters, max_model_len=64)
        try:
            with pytest.raises(ValueError, match="max_model_len"):
                await consume(llm, [5] * 60, SamplingParams(max_tokens=10))
            with pytest.raises(ValueError, match="unknown adapter"):
                await consume(llm, "hi", SamplingParams(), adapter="nope")
            slow = llm.generate("hi", SamplingParams(max_tokens=30, ignore_eos=True), request_id="dup")
            await anext(slow)
            with pytest.raises(ValueError, match="already in use"):
                await consume(llm, "hi", SamplingParams(), request_id="dup")
            await slow.aclose()
        finally:
            await llm.shutdown()

    asyncio.run(main())


def test_adapters_load_and_unload_while_running(adapters):
    async def main():
        llm = new_llm()
        try:
            params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
            running = asyncio.create_task(consume(llm, PROMPTS[1], params))
            await llm.load_adapter("one", adapters["one"])
            assert llm.list_adapters() == {"one": adapters["one"]}
            with pytest.raises(ValueError):
                await llm.load_adapter("bad", adapters["one"] + "-missing")
            gen = llm.generate("hi", SamplingParams(max_tokens=30, ignore_eos=True), adapter="one")
            await anext(gen)
            assert llm.stats()["running_adapters"] == {"one": 1}
            with pytest.raises(ValueError, match="unfinished"):
                await llm.unload_adapter("one")
            await gen.aclose()
            await asyncio.sleep(0.05)
            await llm.unload_adapter("one")
            assert llm.list_adapters() == {}
            last, *_ = await running
            assert len(last.outputs[0].token_ids) == 40
        finally:
            await llm.shutdown()

    asyncio.run(main())


def test_shutdown_drains_then_aborts():
    async def run(drain_timeout: float) -> str:
        llm = new_llm()
        task = asyncio.create_task(consume(llm, "b", SamplingParams(max_tokens=30, ignore_eos=True)))
        while llm.stats()["num_running"] == 0:
            await asyncio.sleep(0.005)
        await llm.shutdown(drain_timeout=drain_timeout)
        with pytest.raises(RuntimeError):
            await consume(llm, "c", SamplingParams())
        last, *_ = await task
        return last.outputs[0].finish_reason

    assert asyncio.run(run(60.0)) == "length"  # drained: finished normally
    assert asyncio.run(run(0.0)) == "abort"


def test_stats_fields():
    llm = new_llm()
    try:
        stats = llm.stats()
        for key in ("num_running", "num_waiting", "kv_usage", "running_adapters", "waiting_adapters"):
            assert key in stats
        assert stats["prompt_tokens_total"] == stats["generation_tokens_total"] == 0
        assert llm.max_model_len == 256 and llm.tokenizer is not None
    finally:
        llm.close()


def test_reset_prefix_cache_waits_for_no_running_request():
    """Refused (False) while a stream holds blocks; once it is done, the repeated prompt is computed again."""
    llm = new_llm()
    prompt, params = PROMPTS[1] * 3, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)

    async def main():
        await consume(llm, prompt, params)
        hits = llm.engine.stats()["prefix_cache_hits_total"]
        stream = llm.generate(prompt, params)
        await stream.__anext__()  # running: its blocks are held
        assert not await llm.reset_prefix_cache()
        async for _ in stream:
            pass
        assert llm.engine.stats()["prefix_cache_hits_total"] > hits  # it found the first run's blocks
        hits = llm.engine.stats()["prefix_cache_hits_total"]
        assert await llm.reset_prefix_cache()
        await consume(llm, prompt, params)
        assert llm.engine.stats()["prefix_cache_hits_total"] == hits

    try:
        asyncio.run(main())
    finally:
        llm.close()


def test_heap_trimmed_when_the_engine_goes_idle(monkeypatch):
    """After work, the idle engine gives the allocator's free memory back (RSS does not ratchet up)."""
    import blora.engine.async_llm as async_llm
    from blora.engine.memory import release_free_memory

    assert release_free_memory() is (sys.platform.startswith("linux") and _glibc())
    calls = []
    monkeypatch.setattr(async_llm, "release_free_memory", lambda: calls.append(time.monotonic()))
    llm = new_llm()

    async def run():
        await consume(llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=4))
        for _ in range(200):
            if calls:
                break
            await asyncio.sleep(0.01)
        await llm.shutdown()

    assert not calls, "no trim before any work"
    asyncio.run(run())
    assert len(calls) == 1, calls


def _glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


def _first_step_sizes(llm: AsyncLLM) -> list[int]:
    """Records, before each engine step, how many requests the engine holds."""
    sizes: list[int] = []
    step = llm.engine.step

    def counted():
        sizes.append(len(llm.engine.requests))
        return step()

    llm.engine.step = counted
    return sizes


def _staggered(llm: AsyncLLM, count: int, spacing_s: float) -> None:
    """``count`` requests submitted ``spacing_s`` apart."""
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def run():
        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(consume(llm, PROMPTS[i % len(PROMPTS)], params)))
            await asyncio.sleep(spacing_s)
        await asyncio.gather(*tasks)
        await llm.shutdown()

    asyncio.run(run())


def test_admission_window_takes_requests_submitted_behind_the_first_into_its_step():
    """An idle engine steps once no request has come for admit_quiet_s (at most admit_max_s after the first):
    requests submitted close behind the first share its first step. With no window the first step holds the
    first request alone."""
    llm = new_llm()
    llm.admit_quiet_s, llm.admit_max_s = 0.5, 5.0
    sizes = _first_step_sizes(llm)
    _staggered(llm, 4, 0.05)
    assert sizes[0] == 4, sizes

    llm = new_llm()
    llm.admit_quiet_s, llm.admit_max_s = 0.5, 0.2  # requests keep coming: the cap starts the step
    sizes = _first_step_sizes(llm)
    _staggered(llm, 12, 0.05)
    assert 1 < sizes[0] < 12, sizes

    llm = new_llm()
    llm.admit_quiet_s = 0.0
    sizes = _first_step_sizes(llm)
    _staggered(llm, 4, 0.2)
    assert sizes[0] == 1, sizes


def test_freeze_startup_heap_keeps_later_garbage_collectable():
    import gc
    import weakref

    from blora.engine.memory import freeze_startup_heap

    class Node:
        pass

    try:
        assert freeze_startup_heap() == gc.get_freeze_count() > 0
        cycle = Node()
        cycle.self = cycle  # garbage only a collection finds
        ref = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert ref() is None, "a cycle made after the freeze is still collected"
    finally:
        gc.unfreeze()  # the test process goes on as before
