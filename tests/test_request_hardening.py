"""Request hardening: nothing invalid reaches an engine step, and one request can never fail another.

- Every sampling field is range-checked at the edge, in the server's request models (400 naming the field,
  the engine never called) and in ``SamplingParams`` (``SamplingParamError`` naming the field), so library
  callers of ``LLM`` / ``AsyncLLM`` are protected too.
- A request refused after its adapter was looked up never pins the adapter: it can be unloaded.
- A request that still fails inside a step (failures injected into its adapter's install, the forward, the
  sampler and the token update) ends alone with ``RequestFailedError``; the others finish exactly as they
  would alone, through ``LLMEngine.step``, ``AsyncLLM`` and the HTTP server.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from blora.engine import LLM, AsyncLLM, SamplingParams
from blora.engine import sampler as sampler_module
from blora.engine.llm_engine import RequestFailedError
from blora.engine.sampling_params import SamplingParamError
from tests.helpers import make_adapter, targets, tiny_model, tokenizer

VOCAB = len(tokenizer())
POISON_TOP_K = 7777  # marks the request whose sampling the tests make fail


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening-adapters")
    base = tiny_model("llama")
    make_adapter(base, root / "one", seed=1, r=4, target_modules=targets("llama", "attn"))
    make_adapter(base, root / "two", seed=2, r=8, target_modules=targets("llama", "mlp"))
    return root


def new_llm(adapter_root, **kw) -> LLM:
    adapters = {name: str(adapter_root / name) for name in ("one", "two")}
    return LLM(tiny_model("llama"), tokenizer=tokenizer(), adapters=adapters, block_size=4, **kw)


@pytest.fixture(scope="module")
def llm(adapter_root):
    return new_llm(adapter_root)


# -- SamplingParams: the library's edge ----------------------------------------------------------------

OUT_OF_RANGE = [
    ("top_k", 10**20), ("top_k", 2**31), ("top_k", 10**5000), ("seed", 2**64), ("seed", -(2**63) - 1),
    ("n", 257), ("temperature", 1e5), ("repetition_penalty", 1e-300), ("repetition_penalty", float("inf")),
    ("repetition_penalty", 1e3), ("stop_token_ids", [2**31]), ("stop_token_ids", list(range(257))),
    ("stop", ["x"] * 17), ("stop", "x" * 257), ("logprobs", 21), ("max_tokens", 0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value"), OUT_OF_RANGE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(OUT_OF_RANGE)]
)
def test_sampling_params_out_of_range_name_the_field(field, value):
    with pytest.raises(SamplingParamError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert len(str(info.value)) < 200  # a huge value is never echoed back whole
    assert pickle.loads(pickle.dumps(info.value)).param == field  # crosses processes (Ray)


def test_sampling_params_edges_accepted():
    for kw in (
        dict(seed=2**63 - 1, n=256),
        dict(seed=-(2**63)),
        dict(top_k=2**31 - 1),
        dict(top_k=-1),
        dict(stop=["x" * 256] * 16, stop_token_ids=list(range(256))),
        dict(repetition_penalty=0.01, temperature=1e4),
    ):
        SamplingParams(**kw)


def test_extreme_seeds_generate_reproducibly(llm):
    for seed in (2**63 - 1, -(2**63)):
        params = SamplingParams(n=3, max_tokens=4, seed=seed)
        first = [c.token_ids for c in llm.generate("Hi", params)[0].outputs]
        assert first == [c.token_ids for c in llm.generate("Hi", params)[0].outputs]


def test_top_k_at_or_above_vocabulary_is_off(llm):
    def run(top_k: int) -> list[int]:
        params = SamplingParams(max_tokens=12, seed=5, top_k=top_k)
        return llm.generate("The history of the city", params)[0].outputs[0].token_ids

    off = run(0)
    assert run(VOCAB) == off and run(2**31 - 1) == off
    assert run(3) != off  # a real top-k still filters


def test_params_changed_after_validation_are_checked_when_queued(adapter_root):
    llm = new_llm(adapter_root)
    params = SamplingParams(seed=1)
    params.seed = 2**64  # a dataclass field: a caller can change it after it was validated
    with pytest.raises(SamplingParamError, match="seed"):
        llm.engine.add_request(None, "Hi", params, "one")
    params = SamplingParams(stop_token_ids=[VOCAB])
    with pytest.raises(SamplingParamError, match="stop_token_ids"):
        llm.engine.add_request(None, "Hi", params, "one")
    assert not llm.engine.requests
    llm.unload_adapter("one")  # never pinned by the refused requests


def test_request_refused_after_the_adapter_lookup_releases_it(adapter_root, monkeypatch):
    llm = new_llm(adapter_root)

    def refuse(req, index):
        raise ValueError("refused while building the request")

    monkeypatch.setattr(llm.engine, "_new_sequence", refuse)
    with pytest.raises(ValueError, match="refused"):
        llm.engine.add_request(None, "Hi", SamplingParams(), "one")
    llm.unload_adapter("one")


# -- the engine: a request failing inside a step fails alone -------------------------------------------

PROMPTS = ["Hello there", "The history of the city begins with", "x", "Why is the sky blue"]
WITNESSES = [  # (prompt, params, adapter): each must finish exactly as it does alone
    (PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), None),
    (PROMPTS[1], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), "one"),
    (PROMPTS[2], SamplingParams(max_tokens=10, seed=11, top_p=0.95, top_k=50, ignore_eos=True), None),
]
POISON = (PROMPTS[3], SamplingParams(max_tokens=10, seed=3, top_k=POISON_TOP_K, ignore_eos=True), "two")


def solo(llm: LLM) -> list[list[int]]:
    return [llm.generate(p, sp, adapters=a)[0].outputs[0].token_ids for p, sp, a in WITNESSES]


def poison_sampler(monkeypatch) -> None:
    """Sampling any batch that holds the poisoned request raises (as an overflow in a filter would)."""
    real = sampler_module.sample_filtered

    def sample_filtered(probs, params, u):
        if any(p.top_k == POISON_TOP_K for p in params):
            raise ValueError("injected sampler failure")
        return real(probs, params, u)

    monkeypatch.setattr(sampler_module, "sample_filtered", sample_filtered)


def poison_forward(monkeypatch, engine, poison_id: str) -> None:
    """The forward of any batch that holds the poisoned request raises once it has 2 generated tokens."""
    real = engine.runner.execute

    def execute(scheduled):
        for s in scheduled:
            if s.seq.request.request_id == poison_id and s.seq.num_output_tokens >= 2:
                raise RuntimeError("injected forward failure")
        return real(scheduled)

    monkeypatch.setattr(engine.runner, "execute", execute)


def poison_install(monkeypatch, engine) -> None:
    """Installing the poisoned request's adapter in a slot raises (as running out of device memory would)."""
    real = engine.store.manager.install

    def install(prepared):
        if prepared.name == POISON[2]:
            raise RuntimeError("injected install failure")
        return real(prepared)

    monkeypatch.setattr(engine.store.manager, "install", install)


def poison_update(engine, poison_id: str) -> None:
    """Appending the poisoned request's 3rd token raises (as a tokenizer failing on it would)."""
    detok = engine.requests[poison_id].seqs[0].detokenizer
    real, count = detok.add_token, [0]

    def add_token(token_id):
        count[0] += 1
        if count[0] == 3:
            raise RuntimeError("injected update failure")
        return real(token_id)

    detok.add_token = add_token


@pytest.mark.parametrize("where", ["install", "forward", "sampler", "update"])
def test_step_failure_of_one_request_fails_it_alone(adapter_root, monkeypatch, where):
    llm = new_llm(adapter_root)
    expected = solo(llm)
    engine = llm.engine
    ids = [engine.add_request(None, p, sp, a) for p, sp, a in WITNESSES]
    poison_id = engine.add_request(None, *POISON)
    if where == "install":
        poison_install(monkeypatch, engine)
    elif where == "sampler":
        poison_sampler(monkeypatch)
    elif where == "forward":
        poison_forward(monkeypatch, engine, poison_id)
    else:
        poison_update(engine, poison_id)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert [final[i].outputs[0].token_ids for i in ids] == expected
    assert all(final[i].error is None for i in ids)
    failed = final[poison_id]
    assert isinstance(failed.error, RequestFailedError) and "injected" in str(failed.error)
    assert failed.outputs[0].finish_reason == "abort"
    assert not engine.requests and engine.block_manager.usage == 0
    llm.unload_adapter("two")  # the failed request released its adapter


def test_async_stream_of_a_failing_request_raises_the_others_finish(adapter_root, llm, monkeypatch):
    expected = solo(llm)  # before the sampler is poisoned

    async def consume(engine: AsyncLLM, prompt, params, adapter) -> list[int]:
        ids: list[int] = []
        async for out in engine.generate(prompt, params, adapter=adapter):
            ids += out.outputs[0].delta_token_ids
        return ids

    async def main():
        adapters = {name: str(adapter_root / name) for name in ("one", "two")}
        engine = AsyncLLM(tiny_model("llama"), tokenizer=tokenizer(), adapters=adapters, block_size=4)
        try:
            results = await asyncio.gather(
                *(consume(engine, p, sp, a) for p, sp, a in [*WITNESSES, POISON]), return_exceptions=True
            )
            await engine.unload_adapter("two")  # every request that used it let it go
            return results
        finally:
            await engine.shutdown()

    poison_sampler(monkeypatch)
    *witnesses, poisoned = asyncio.run(main())
    assert witnesses == expected
    assert isinstance(poisoned, RequestFailedError) and "injected sampler failure" in str(poisoned)


# -- the server: refused at the edge, the engine never called --------------------------------------------

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from blora.server import ServerConfig, create_app  # noqa: E402
from tests.test_server_api import BASE, assert_error, make_client  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

HOSTILE_COMPLETIONS = [
    ({"top_k": 100000000000000000000, "temperature": 1, "stream": True}, "top_k"),
    ({"top_k": 2**31}, "top_k"),
    ({"seed": 18446744073709551616}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"n": 65}, "n"),
    ({"stop_token_ids": [10**20]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(257))}, "stop_token_ids"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"presence_penalty": 1e300}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"temperature": 1e300}, "temperature"),
    ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"prompt": [10**20]}, "prompt"),
    ({"prompt": [[1, 2], [-1]]}, "prompt"),
    ({"model": BASE, "adapter_mixture": {"sql": 1e300}}, "adapter_mixture"),
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return tokenizer()


@pytest.mark.parametrize(
    ("extra", "param"), HOSTILE_COMPLETIONS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(HOSTILE_COMPLETIONS)]
)
def test_hostile_completion_fields_get_400_naming_the_field(hf_tokenizer, extra, param):
    client, engine = make_client(hf_tokenizer)
    with client:
        body = {"model": "sql", "prompt": "Hi", "max_tokens": 8} | extra
        assert_error(client.post("/v1/completions", json=body), 400, param)
    assert engine.calls == []  # never reached the engine


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"max_completion_tokens": 10**30}, "max_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"top_k": 10**20}, "top_k"),
    ],
)
def test_hostile_chat_fields_get_400_naming_the_field(hf_tokenizer, extra, param):
    client, engine = make_client(hf_tokenizer)
    with client:
        body = {"model": "sql", "messages": [{"role": "user", "content": "Hi"}]} | extra
        assert_error(client.post("/v1/chat/completions", json=body), 400, param)
    assert engine.calls == []


# -- the server over the real engine --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(adapter_root):
    engine = AsyncLLM(tiny_model("llama"), tokenizer=tokenizer(), block_size=4, max_num_seqs=8)
    config = ServerConfig(
        served_model_name=BASE,
        model_source="tiny",
        max_num_seqs=8,
        adapter_root=adapter_root,
        allow_runtime_adapters=True,
    )
    with TestClient(create_app(engine, config)) as client:
        client.engine = engine
        yield client


def stream_text(resp) -> str:
    assert resp.status_code == 200, resp.text
    events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    assert all("error" not in e for e in events), events
    return "".join(c["text"] for e in events for c in e["choices"])


def test_hostile_requests_never_disturb_running_streams(server):
    prompts = PROMPTS[:4]
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    reference = LLM(tiny_model("llama"), tokenizer=tokenizer(), block_size=4)
    expected = [o.outputs[0].text for o in reference.generate(prompts, params)]
    base = {"model": BASE, "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True}
    hostile = [
        {"top_k": 100000000000000000000, "temperature": 1},
        {"seed": 18446744073709551616, "temperature": 1},
        {"stop_token_ids": [VOCAB]},
    ]
    started = threading.Event()

    def run(prompt: str) -> str:
        started.set()
        return stream_text(server.post("/v1/completions", json=base | {"prompt": prompt}))

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(run, p) for p in prompts]
        started.wait()
        deadline = time.monotonic() + 30
        while server.engine.stats()["num_running"] < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.005)
        for extra in hostile:
            err = assert_error(server.post("/v1/completions", json=base | {"prompt": "Hi"} | extra), 400)
            assert next(iter(extra)) in err["message"] or err["param"] == next(iter(extra)), err
        texts = [f.result() for f in futures]
    assert texts == expected


def test_refused_request_leaves_its_adapter_unloadable(server):
    load = {"lora_name": "pinned", "lora_path": "one"}
    assert server.post("/v1/load_lora_adapter", json=load).status_code == 200, "load"
    body = {"model": "pinned", "prompt": "Hi", "max_tokens": 8, "seed": 18446744073709551616}
    assert_error(server.post("/v1/completions", json=body), 400, "seed")
    body = {"model": "pinned", "prompt": "Hi", "max_tokens": 8, "stop_token_ids": [VOCAB]}
    assert_error(server.post("/v1/completions", json=body | {"stream": True}), 400, "stop_token_ids")
    r = server.post("/v1/unload_lora_adapter", json={"lora_name": "pinned"})
    assert r.status_code == 200, r.text
