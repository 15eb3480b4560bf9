"""``EngineProcess``: the engine in a child process behind the ``EngineClient`` interface (``blora serve``'s
default). Outputs equal the in-process engine's (itself checked against PEFT), streams and aborts behave as
``AsyncLLM``'s, errors cross the pipe with their type and field, adapters load, unload and resolve under a
root from here, and a dead child ends every stream instead of hanging it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import pytest

from blora.engine import LLM, SamplingParams
from blora.engine.client import EngineClient
from blora.engine.process import EngineDeadError, EngineProcess
from blora.engine.sampling_params import SamplingParamError
from blora.lora import AdapterError, AdapterInUseError
from tests.helpers import consume, make_adapter, save_tiny_model, targets, tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPTS = ["Hello", "The history of the city begins with a long story about", "x", "Why is the sky"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-process")
    model = save_tiny_model("llama", root / "model")
    base = tiny_model("llama")
    adapters = root / "adapters"  # an adapter root: sub-folders resolve by name
    one = make_adapter(base, adapters / "one", seed=1, r=4, target_modules=targets("llama", "attn"))
    two = make_adapter(base, root / "two", seed=2, r=8, target_modules=targets("llama", "mlp"))
    broken = root / "broken"
    shutil.copytree(two, broken)
    (broken / "adapter_config.json").write_text("{not json")
    return {
        "model": str(model),
        "root": str(adapters),
        "one": str(one),
        "two": str(two),
        "broken": str(broken),
    }


@pytest.fixture(scope="module")
def engine(files):
    llm = EngineProcess(
        files["model"], adapters={"two": files["two"]}, adapter_root=files["root"], block_size=4, threads=1
    )
    yield llm
    llm.close()


def test_is_an_engine_client_with_the_engines_limits(engine, files):
    client: EngineClient = engine
    assert isinstance(client, EngineClient)
    assert engine.limits.max_model_len == engine.max_model_len
    assert engine.limits.vocab_size >= len(tokenizer())
    assert engine.tokenizer.encode("Hello world") == tokenizer().encode("Hello world")
    assert engine.structured_outputs.vocab_size == engine.limits.vocab_size
    assert engine._process.is_alive() and engine._process.pid != os.getpid()


def test_streams_match_the_in_process_engine(engine, files):
    """Base rows, a registered adapter and one found under the root, concurrently, n=2 and a stop string:
    the same tokens and text as ``LLM.generate`` in this process, the deltas adding up to the final output."""
    names = [None, "two", "one", "two"]
    offline = LLM(files["model"], adapters={"two": files["two"]}, adapter_root=files["root"], block_size=4)
    expected = offline.generate(PROMPTS, GREEDY, adapters=names)
    stop_text = expected[1].outputs[0].text[3:6]
    stopping = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop_text])
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=2)
    expected_stop = offline.generate([PROMPTS[1]], stopping, adapters=["two"])[0]
    expected_n = offline.generate([PROMPTS[0]], sampled, adapters=["one"])[0]

    async def main():
        jobs = [consume(engine, p, GREEDY, a) for p, a in zip(PROMPTS, names, strict=True)]
        jobs.append(consume(engine, PROMPTS[1], stopping, "two"))
        n_job = engine.generate(PROMPTS[0], sampled, adapter="one")
        results = await asyncio.gather(*jobs)
        outs = [out async for out in n_job]
        return results, outs[-1]

    results, last_n = asyncio.run(main())
    for (last, text, ids, count), ref in zip(results, [*expected, expected_stop], strict=True):
        assert last.finished and count >= 1
        assert last.outputs[0].token_ids == ref.outputs[0].token_ids == ids
        assert last.outputs[0].text == ref.outputs[0].text == text
        assert last.outputs[0].finish_reason == ref.outputs[0].finish_reason
        assert last.prompt_token_ids == ref.prompt_token_ids
    assert all(count > 1 for *_, count in results[:4])  # streamed token by token
    assert results[-1][0].outputs[0].stop_reason == stop_text
    assert [c.token_ids for c in last_n.outputs] == [c.token_ids for c in expected_n.outputs]


def test_bad_requests_fail_with_their_field_and_others_run(engine):
    async def main():
        good = asyncio.ensure_future(consume(engine, "Hello", GREEDY, "two"))
        with pytest.raises(SamplingParamError) as bad_ids:
            await consume(engine, "Hello", SamplingParams(max_tokens=4, stop_token_ids=[10**9]))
        with pytest.raises(AdapterError, match="nope"):
            await consume(engine, "Hello", GREEDY, "nope")
        with pytest.raises(ValueError, match="already in use"):
            agen = engine.generate("Hello", GREEDY, request_id="dup")
            await agen.__anext__()
            await consume(engine, "Hi", GREEDY, request_id="dup")
        await agen.aclose()
        return bad_ids.value, await good

    error, (last, *_) = asyncio.run(main())
    assert error.param == "stop_token_ids"
    assert last.finished and len(last.outputs[0].token_ids) == GREEDY.max_tokens


def test_abort_and_early_close_free_the_request(engine):
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        outs = []
        async for out in engine.generate("Count:", long, request_id="to-abort"):
            outs.append(out)
            if len(outs) == 2:
                assert await engine.abort("to-abort")
        agen = engine.generate("Count:", long, adapter="two")
        await agen.__anext__()
        await agen.aclose()  # closing early aborts it in the engine's process
        assert not await engine.abort("never-seen")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 200
    deadline = time.monotonic() + 10
    while engine.stats()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["num_running"] == 0 and engine.stats()["kv_usage"] == 0
    assert engine.stats()["generation_tokens_total"] > 0


def test_adapters_load_unload_and_resolve_here(engine, files):
    assert engine.list_adapters() == {"two": files["two"], "one": files["one"]}
    assert engine.adapter_source("one") == files["one"]  # under the root, looked up in this process
    assert engine.adapter_source("../two") is None and engine.adapter_source("nope") is None

    async def main():
        await engine.load_adapter("extra", files["two"])
        assert engine.adapter_source("extra") == files["two"]
        extra = await consume(engine, "Hello", GREEDY, "extra")
        with pytest.raises(AdapterError, match="broken"):
            await engine.load_adapter("bad", files["broken"])
        agen = engine.generate("Count:", SamplingParams(max_tokens=200, ignore_eos=True), adapter="extra")
        await agen.__anext__()
        with pytest.raises(AdapterInUseError, match="extra"):
            await engine.unload_adapter("extra")
        await agen.aclose()
        await engine.unload_adapter("extra", wait=True)
        assert await engine.reset_prefix_cache()
        return extra

    extra = asyncio.run(main())
    two = asyncio.run(consume(engine, "Hello", GREEDY, "two"))
    assert extra[2] == two[2]  # the same weights under another name
    assert "extra" not in engine.list_adapters() and engine.adapter_source("bad") is None


def test_start_failure_raises_the_engines_error(tmp_path):
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineProcess(None, max_num_seqs=0, threads=1)


def test_shutdown_drains_then_the_process_exits(files):
    llm = EngineProcess(files["model"], block_size=4, threads=1)

    async def main():
        job = asyncio.ensure_future(consume(llm, "Hello", GREEDY))
        await asyncio.sleep(0.01)
        await llm.shutdown(drain_timeout=30)
        return await job

    last, *_ = asyncio.run(main())
    assert last.outputs[0].finish_reason == "length"  # finished within the drain, not aborted
    assert not llm._process.is_alive() and llm._process.exitcode == 0
    with pytest.raises(RuntimeError, match="shutting down"):
        asyncio.run(consume(llm, "Hello", GREEDY))


def test_a_dead_engine_ends_every_stream(files):
    llm = EngineProcess(files["model"], block_size=4, threads=1)
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        agen = llm.generate("Count:", long)
        await agen.__anext__()
        os.kill(llm._process.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exited unexpectedly"):
            async for _ in agen:
                pass
        with pytest.raises(EngineDeadError):
            await consume(llm, "Hello", GREEDY)
        with pytest.raises(EngineDeadError):
            await llm.load_adapter("two", files["two"])

    asyncio.run(asyncio.wait_for(main(), 60))
    llm.close()  # nothing left to stop: returns


def test_the_server_answers_503_once_its_engine_is_dead(files):
    from fastapi.testclient import TestClient

    from blora.server import ServerConfig, create_app

    llm = EngineProcess(files["model"], block_size=4, threads=1)
    app = create_app(llm, ServerConfig(served_model_name="base", model_source=files["model"]))
    body = {"model": "base", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        os.kill(llm._process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not llm.dead and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").status_code == 503
        failed = client.post("/v1/completions", json=body)
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "engine_dead"
        assert "exited unexpectedly" in failed.json()["error"]["message"]
