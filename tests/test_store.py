"""Adapter store in the engine: tiers (CPU cache budget, LRU slots, pinning), prefetch in the background,
hot load / replace / unload while requests run, root directories with path containment, and the cost of
thousands of registrations. Greedy outputs are checked against PEFT running each adapter alone.
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading
import time
import tracemalloc

import pytest
import torch
from peft import PeftModel

from blora.engine import AsyncLLM, SamplingParams
from blora.engine.llm import LLM, build_engine
from blora.lora import AdapterError
from blora.lora.store import AdapterInUseError, contained_path
from tests.helpers import make_adapter, tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (rank, alpha, targets)
ADAPTERS = {
    "a": (2, 4, ["q_proj", "v_proj"]),
    "b": (8, 8, ["gate_proj", "down_proj"]),
    "c": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]),
    "d": (3, 6, "all-linear"),
}
PROMPTS = {"a": [5, 17, 300, 42, 7], "b": [900, 12, 33], "c": [77, 1000, 2000, 3, 4, 5, 6], "d": [11, 12]}
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("root")
    dirs = {}
    for i, (name, (r, alpha, target)) in enumerate(ADAPTERS.items()):
        dirs[name] = make_adapter(
            base, root / name, seed=10 + i, r=r, lora_alpha=alpha, target_modules=target
        )
    refs = {name: reference(base, dirs[name], PROMPTS[name]) for name in ADAPTERS}
    # the prompt of "a" run through every adapter (for replace checks)
    cross = {name: reference(base, dirs[name], PROMPTS["a"]) for name in ADAPTERS}
    return base, root, dirs, refs, cross


def reference(base, path, prompt, max_tokens=6) -> list[int]:
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def new_engine(**kwargs):
    kwargs.setdefault("block_size", 4)
    return build_engine(tiny_model("llama"), tokenizer=tokenizer(), **kwargs)


def drain(engine, limit: int = 10_000) -> dict:
    final = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def tokens(out) -> list[int]:
    return out.outputs[0].token_ids


# ----------------------------------------------------------------------------------- reload isolation


def test_output_unchanged_after_another_adapter_is_used_unloaded_and_reloaded(env):
    base, root, dirs, refs, _ = env
    # Prefix caching off: a cached prompt is computed in another batch shape (only its last block), whose
    # float32 GEMMs may round differently (seen with AVX-512 oneDNN kernels); this test wants the same
    # computation twice, so that any difference is the reloaded weights'.
    llm = LLM(
        tiny_model("llama"), tokenizer=tokenizer(), block_size=4, max_loras=1, enable_prefix_caching=False
    )
    llm.load_adapter("a", dirs["a"])
    first = llm.generate(PROMPTS["a"], GREEDY, adapters="a")[0]
    assert tokens(first) == refs["a"]
    for source in ("b", "c"):  # B is used, unloaded, and reloaded (from another adapter's files)
        llm.load_adapter("B", dirs[source])
        assert tokens(llm.generate(PROMPTS[source], GREEDY, adapters="B")[0]) == refs[source]
        llm.unload_adapter("B")
        again = llm.generate(PROMPTS["a"], GREEDY, adapters="a")[0]
        assert tokens(again) == refs["a"]
        assert again.outputs[0].logprobs == first.outputs[0].logprobs  # bit-identical, not just argmax
    assert llm.engine.store.stats().slot_evictions >= 2  # one slot: "a" really was swapped out


# ------------------------------------------------------------------------------------------------ tiers


def test_cpu_cache_budget_and_slot_lru(env):
    base, root, dirs, refs, _ = env
    sizes = {}
    probe = new_engine()
    for name, path in dirs.items():
        sizes[name] = probe.store.manager.prepare(name, path, device="cpu").nbytes
    budget = sizes["b"] + sizes["c"]  # holds two of the larger adapters, never all four
    engine = new_engine(max_loras=2, cpu_cache_bytes=budget)
    for name, path in dirs.items():
        engine.register_adapter(name, path)
    for rnd in range(2):
        for name in ADAPTERS:
            engine.add_request(f"{name}{rnd}", PROMPTS[name], GREEDY, name)
        for rid, out in drain(engine).items():
            assert tokens(out) == refs[rid[0]], rid
        stats = engine.store.stats()
        assert stats.cache_peak_bytes <= budget
        assert len(stats.active) <= 2
    assert stats.cache_evictions > 0 and stats.slot_evictions > 0
    assert stats.loads > len(ADAPTERS)  # evicted adapters were read again in round two
    assert stats.resident_bytes <= budget + sum(sorted(sizes.values())[-2:])


def test_pinned_adapter_stays_in_its_own_slot(env):
    base, root, dirs, refs, _ = env
    engine = new_engine(max_loras=1)
    engine.load_adapter("a", dirs["a"])
    engine.store.pin("a")
    for name in ("b", "c", "d"):
        engine.register_adapter(name, dirs[name])
        engine.add_request(name, PROMPTS[name], GREEDY, name)
    engine.add_request("a", PROMPTS["a"], GREEDY, "a")
    for rid, out in drain(engine).items():
        assert tokens(out) == refs[rid]
    stats = engine.store.stats()
    assert "a" in stats.active and stats.pinned == ["a"]
    assert len(stats.active) == 2  # the pinned one + one LRU slot
    assert stats.slot_evictions == 2  # b -> c -> d, never a


def test_prefetch_loads_waiting_adapters_in_the_background(env):
    """With one slot, the adapters of waiting requests are read from disk by the loader thread while the
    first request runs; the engine thread never reads an adapter."""
    base, root, dirs, refs, _ = env
    engine = new_engine(max_loras=1)
    loads: list[tuple[str, str, float]] = []
    prepare = engine.store.manager.prepare

    def spy(name, *args, **kwargs):
        result = prepare(name, *args, **kwargs)
        loads.append((name, threading.current_thread().name, time.perf_counter()))
        return result

    engine.store.manager.prepare = spy
    for name in ("a", "b", "c"):
        engine.register_adapter(name, dirs[name])
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine.add_request("a", PROMPTS["a"], long, "a")
    engine.add_request("b", PROMPTS["b"], GREEDY, "b")
    engine.add_request("c", PROMPTS["c"], GREEDY, "c")
    finished_at = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = time.perf_counter()
                if out.request_id != "a":
                    assert tokens(out) == refs[out.request_id]
    assert {thread for _, thread, _ in loads} == {"blora-adapter-loader"}
    loaded_at = {name: t for name, _, t in loads}
    assert loaded_at["b"] < finished_at["a"]  # ready before its turn
    assert engine.store.stats().arrivals == {"disk": 3}


def test_failed_background_load_fails_only_its_requests(env, tmp_path):
    base, root, dirs, refs, _ = env
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((dirs["a"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine = new_engine()
    engine.register_adapter("a", dirs["a"])
    engine.register_adapter("broken", broken)  # registration reads nothing, so this succeeds
    engine.add_request("good", PROMPTS["a"], GREEDY, "a")
    engine.add_request("bad", PROMPTS["a"], GREEDY, "broken")
    final = drain(engine)
    assert tokens(final["good"]) == refs["a"]
    assert isinstance(final["bad"].error, AdapterError) and "broken" in str(final["bad"].error)
    assert final["bad"].outputs[0].finish_reason == "abort"
    llm = LLM(tiny_model("llama"), tokenizer=tokenizer(), adapters={"broken": str(broken)})
    with pytest.raises(AdapterError, match="cannot read"):
        llm.generate(PROMPTS["a"], GREEDY, adapters="broken")
    assert not llm.engine.has_unfinished_requests()


# ------------------------------------------------------------------------------ hot load / unload / replace


def test_unload_in_use_is_refused_or_waits_without_losing_requests(env):
    base, root, dirs, refs, _ = env
    engine = new_engine()
    engine.load_adapter("a", dirs["a"])
    engine.add_request("r1", PROMPTS["a"], GREEDY, "a")
    engine.step()
    with pytest.raises(AdapterInUseError, match="unfinished request"):
        engine.unload_adapter("a")
    future = engine.unload_adapter("a", wait=True)
    assert future is not None and not future.done()
    with pytest.raises(AdapterError, match="being unloaded"):
        engine.add_request("r2", PROMPTS["a"], GREEDY, "a")
    final = drain(engine)
    assert tokens(final["r1"]) == refs["a"]  # finished, on its own weights
    assert future.done() and "a" not in engine.list_adapters()
    assert engine.store.stats().active == []


def test_replace_in_use_lets_old_requests_finish_on_old_weights(env):
    base, root, dirs, refs, cross = env
    engine = new_engine()
    engine.load_adapter("x", dirs["a"])
    engine.add_request("old", PROMPTS["a"], GREEDY, "x")
    engine.step()
    with pytest.raises(AdapterInUseError):
        engine.load_adapter("x", dirs["b"], replace=True)
    future = engine.load_adapter("x", dirs["b"], replace=True, wait=True)
    engine.add_request("new", PROMPTS["a"], GREEDY, "x")  # accepted, runs on the new weights
    final = drain(engine)
    assert future.done()
    assert tokens(final["old"]) == cross["a"]
    assert tokens(final["new"]) == cross["b"]
    assert final["new"].metrics.first_token_time >= final["old"].metrics.finished_time
    engine.load_adapter("x", dirs["c"], replace=True)  # idle: swapped at once
    engine.add_request("idle", PROMPTS["a"], GREEDY, "x")
    assert tokens(drain(engine)["idle"]) == cross["c"]


def test_async_hot_load_and_unload_under_traffic(env):
    base, root, dirs, refs, _ = env

    async def consume(llm, prompt, adapter):
        last = None
        async for out in llm.generate(prompt, GREEDY, adapter=adapter):
            last = out
        return last

    async def main():
        llm = AsyncLLM(tiny_model("llama"), tokenizer=tokenizer(), block_size=4, max_loras=2)
        try:
            await llm.load_adapter("a", dirs["a"])
            running = [asyncio.create_task(consume(llm, PROMPTS["a"], "a")) for _ in range(3)]
            await llm.load_adapter("b", dirs["b"])  # while "a" requests run
            running.append(asyncio.create_task(consume(llm, PROMPTS["b"], "b")))
            await asyncio.sleep(0)
            while llm.stats()["num_running"] == 0:
                await asyncio.sleep(0.002)
            await llm.unload_adapter("a", wait=True)  # returns after its requests finished
            outs = await asyncio.gather(*running)
            assert [tokens(o) for o in outs] == [refs["a"]] * 3 + [refs["b"]]
            assert "a" not in llm.list_adapters()
            with pytest.raises(ValueError, match="unknown adapter"):
                await consume(llm, PROMPTS["a"], "a")
        finally:
            await llm.shutdown()

    asyncio.run(main())


# ------------------------------------------------------------------------------------ roots and containment


def test_adapter_root_loads_on_first_use(env):
    base, root, dirs, refs, _ = env
    llm = LLM(tiny_model("llama"), tokenizer=tokenizer(), adapter_root=str(root), max_loras=2)
    assert set(llm.list_adapters()) == set(ADAPTERS)
    assert llm.engine.store.stats().loads == 0
    outs = llm.generate([PROMPTS[n] for n in ADAPTERS], GREEDY, adapters=list(ADAPTERS))
    assert [tokens(o) for o in outs] == [refs[n] for n in ADAPTERS]


def test_names_cannot_leave_the_root(env, tmp_path):
    base, root, dirs, refs, _ = env
    inner = tmp_path / "inner"
    inner.mkdir()
    outside = tmp_path / "outside"
    make_adapter(base, outside, seed=3, r=2, target_modules=["q_proj"])
    (inner / "escape").symlink_to(outside, target_is_directory=True)
    (inner / "sneaky").mkdir()
    (inner / "sneaky" / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    (inner / "ok").symlink_to(dirs["a"], target_is_directory=True)  # resolves outside too: refused
    engine = new_engine(adapter_root=str(inner))
    for bad in ("../outside", str(outside), "escape", "sneaky", "ok", "", "a/../../outside", "~root"):
        with pytest.raises(AdapterError):
            engine.add_request(None, [1, 2, 3], GREEDY, bad)
    assert engine.list_adapters() == {}
    for bad in ("../x", "/etc", "x/./y", "x//y", "a\\b"):
        with pytest.raises(AdapterError):
            contained_path(inner, bad)


# ------------------------------------------------------------------------------------- registration cost


def test_thousand_registrations_cost_almost_nothing(env, tmp_path):
    base, root, dirs, refs, _ = env
    engine = new_engine()
    garbage = tmp_path / "garbage"  # nothing is read at registration: broken files go unnoticed
    garbage.mkdir()
    (garbage / "adapter_config.json").write_text("{not json")
    tracemalloc.start()
    t0 = time.perf_counter()
    for i in range(1000):
        engine.register_adapter(f"customer-{i}", garbage)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"1000 registrations: {elapsed * 1e3:.1f} ms, {peak / 1024:.0f} KiB traced")
    assert peak < 2 << 20
    stats = engine.store.stats()
    assert stats.registered == 1000 and stats.loads == 0 and stats.cached == []
    engine.add_request("r", [1, 2, 3], GREEDY, "customer-7")  # the error only comes when it is used
    error = drain(engine)["r"].error
    assert isinstance(error, AdapterError) and "customer-7" in str(error) and "JSON" in str(error)


def test_thousand_adapters_under_a_root_are_not_read_until_used(env, tmp_path):
    base, root, dirs, refs, _ = env
    big = tmp_path / "many"
    config = (dirs["a"] / "adapter_config.json").read_text()
    for i in range(1000):
        (big / f"u{i}").mkdir(parents=True)
        (big / f"u{i}" / "adapter_config.json").write_text(config)
    os.symlink(dirs["a"] / "adapter_model.safetensors", big / "u7" / "adapter_model.safetensors")
    engine = new_engine(adapter_root=[str(big), str(root)])
    assert len(engine.list_adapters()) == 999 + len(ADAPTERS)  # u7 is not offered
    engine.add_request("r", PROMPTS["a"], GREEDY, "a")  # found in the second root
    assert tokens(drain(engine)["r"]) == refs["a"]
    with pytest.raises(AdapterError, match="symlink out of the adapter root"):
        engine.add_request("s", PROMPTS["a"], GREEDY, "u7")
    assert engine.store.stats().loads == 1
