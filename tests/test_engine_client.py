"""The engine interface the server depends on (``EngineClient``) and the one request validator.

Both engines implement the protocol (``AsyncLLM`` here; ``ClusterEngine`` without a Ray cluster, its
handles faked); mypy checks the same thing statically where ``create_app`` is called with each. The
validator's rules (``blora.engine.validation``) are the engine's and the server's: a request one refuses,
the other refuses with the same field.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from blora.engine import AsyncLLM, SamplingParams
from blora.engine.client import EngineClient, EngineLimits
from blora.engine.sampling_params import SamplingParamError
from blora.engine.validation import (
    ContextLengthError,
    check_prompt_ids,
    check_token_ids,
    resolve_max_tokens,
)
from tests.helpers import tiny_model, tokenizer

EXTRA_ROWS = 64  # the tiny model embeds more ids than the tokenizer has (as real models pad their vocab)


@pytest.fixture(scope="module")
def engine():
    tok = tokenizer()
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok) + EXTRA_ROWS)
    llm = AsyncLLM(model, tokenizer=tok, max_model_len=64, max_loras=3, max_lora_rank=8)
    yield llm
    llm.close()


# -- the protocol ---------------------------------------------------------------------------------------
def test_async_llm_is_an_engine_client(engine):
    client: EngineClient = engine  # the static check (mypy) ...
    assert isinstance(client, EngineClient)  # ... and the runtime one
    limits = client.limits
    assert limits == EngineLimits(
        max_model_len=64, vocab_size=len(tokenizer()) + EXTRA_ROWS, max_loras=3, max_lora_rank=8
    )
    assert limits.replace_adapters
    assert client.structured_outputs is engine.engine.sampler.structured  # the engine's grammar cache


def test_an_object_without_the_interface_is_not_a_client():
    class Partial:
        tokenizer = None

        async def generate(self, prompt, sampling_params=None, adapter=None, request_id=None):
            yield None

    assert not isinstance(Partial(), EngineClient)


class _Remote:
    """A Ray method handle stand-in: ``.remote(...)`` returns an awaitable."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)

        return call()


class _Registry:
    def __init__(self) -> None:
        from blora.ray.registry import ClusterState

        self.adapters = {"a": "/a"}
        self.state = _Remote(lambda: ClusterState(1, dict(self.adapters)))
        self.remove = _Remote(lambda name: self.adapters.pop(name))


def test_cluster_engine_is_an_engine_client():
    pytest.importorskip("ray")
    from blora.lora import AdapterInUseError
    from blora.ray.cluster_engine import ClusterEngine

    tok = tokenizer()
    limits = EngineLimits(max_model_len=128, vocab_size=len(tok), max_loras=4)
    registry = _Registry()
    cluster = ClusterEngine(None, registry, {"tokenizer": tok, "limits": limits})
    client: EngineClient = cluster
    assert isinstance(client, EngineClient)
    assert client.limits == dataclasses.replace(limits, replace_adapters=False)  # replicas cannot swap
    assert client.structured_outputs.vocab_size == len(tok)

    async def scenario() -> None:
        await cluster.refresh()
        with pytest.raises(SamplingParamError) as info:
            await cluster.load_adapter("a", "/b", replace=True)
        assert info.value.param == "replace" and "unload, then load" in str(info.value)
        cluster._running["r1"] = (None, ["a"])  # a request through this ingress uses "a"
        with pytest.raises(AdapterInUseError):
            await cluster.unload_adapter("a")
        waiting = asyncio.create_task(cluster.unload_adapter("a", wait=True))
        await asyncio.sleep(0.2)
        assert not waiting.done() and "a" in cluster.list_adapters()
        del cluster._running["r1"]  # the request ends: the unload goes through
        await asyncio.wait_for(waiting, 5)
        assert cluster.list_adapters() == {}

    asyncio.run(scenario())


# -- the validator: one rule each -----------------------------------------------------------------------
def test_token_ids_are_checked_against_the_model_vocabulary():
    check_token_ids("prompt", [0, 9], 10)
    for ids in ([10], [-1], [3, 12]):
        with pytest.raises(SamplingParamError) as info:
            check_token_ids("stop_token_ids", ids, 10)
        assert info.value.param == "stop_token_ids" and "outside the vocabulary [0, 10)" in str(info.value)
    with pytest.raises(SamplingParamError) as info:
        check_prompt_ids([], 10)
    assert info.value.param == "prompt" and "empty" in str(info.value)


def test_max_tokens_resolves_within_the_context():
    assert resolve_max_tokens(10, None, 64) == 54  # the room left
    assert resolve_max_tokens(10, None, 64, default=16) == 16  # a default, capped by the room
    assert resolve_max_tokens(60, None, 64, default=16) == 4
    assert resolve_max_tokens(10, 54, 64) == 54
    for prompt_len, max_tokens in ((10, 55), (64, None), (70, 1)):
        with pytest.raises(ContextLengthError) as info:
            resolve_max_tokens(prompt_len, max_tokens, 64)
        assert info.value.param == "max_tokens" and info.value.code == "context_length_exceeded"
        assert "maximum context length is 64 tokens" in str(info.value)


def test_engine_and_server_accept_and_refuse_the_same_token_ids(engine):
    """Ids the tokenizer does not know but the model embeds are valid for both; past the embeddings, both
    refuse naming ``prompt``."""
    from fastapi.testclient import TestClient

    from blora.server import ServerConfig, create_app

    vocab = engine.limits.vocab_size
    inside, outside = [1, vocab - 1], [1, vocab]

    async def engine_side(ids: list[int]) -> str:
        params = SamplingParams(max_tokens=2, temperature=0)
        async for out in engine.generate(ids, params, request_id=f"ids-{ids[-1]}"):
            if out.finished:
                return out.outputs[0].finish_reason
        raise AssertionError("no final output")

    assert asyncio.run(engine_side(inside)) == "length"
    with pytest.raises(SamplingParamError) as info:
        asyncio.run(engine_side(outside))
    assert info.value.param == "prompt"
    config = ServerConfig(served_model_name="base", shutdown_engine=False)
    with TestClient(create_app(engine, config)) as http:
        body = {"model": "base", "max_tokens": 2, "temperature": 0}
        assert http.post("/v1/completions", json={**body, "prompt": inside}).status_code == 200
        r = http.post("/v1/completions", json={**body, "prompt": outside})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert f"outside the vocabulary [0, {vocab})" in r.json()["error"]["message"]
        r = http.post("/detokenize", json={"tokens": outside})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
        assert http.post("/detokenize", json={"tokens": inside}).status_code == 200
        r = http.post("/v1/completions", json={**body, "prompt": [1] * 60, "max_tokens": 10})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_the_server_resolves_a_model_under_the_engine_root_without_listing(tmp_path, monkeypatch):
    """An ``AsyncLLM`` built with ``adapter_root`` and served through ``create_app``: each request's
    ``model`` is looked up by name (``adapter_source``), never by listing the root on the event loop."""
    from fastapi.testclient import TestClient

    from blora.server import ServerConfig, create_app
    from tests.helpers import make_adapter

    model = tiny_model("llama")
    make_adapter(model, tmp_path / "root" / "under", seed=1, r=2, target_modules=["q_proj"])
    llm = AsyncLLM(model, tokenizer=tokenizer(), max_model_len=64, adapter_root=str(tmp_path / "root"))
    try:
        assert llm.adapter_source("under") == llm.list_adapters()["under"]
        assert llm.adapter_source("missing") is None

        def no_listing():
            raise AssertionError("the root was listed while serving a request")

        monkeypatch.setattr(llm.engine.store.registry, "list", no_listing)
        config = ServerConfig(served_model_name="base", shutdown_engine=False)
        with TestClient(create_app(llm, config)) as http:
            body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
            assert http.post("/v1/completions", json={**body, "model": "under"}).status_code == 200
            assert http.post("/v1/completions", json={**body, "model": "missing"}).status_code == 404
    finally:
        llm.close()
