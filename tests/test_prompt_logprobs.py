"""``SamplingParams(prompt_logprobs=k)``: per prompt token the logprob under the model (PEFT with an adapter,
the plain model without), its rank and the top-k, the same with chunked prefill and with prefix caching on
(cached blocks of an earlier request are not used), and rows that do not ask are unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from blora.engine import SamplingParams
from blora.engine.llm import build_engine
from blora.engine.outputs import Logprob
from blora.engine.sampling_params import SamplingParamError
from tests.helpers import make_adapter, peft_logits, targets, tiny_model, tokenizer

K = 5
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
ASK = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=K)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("plp")
    return make_adapter(
        tiny_model("llama"), root / "a", seed=1, r=4, lora_alpha=8, target_modules=targets("llama", "all")
    )


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, len(tokenizer()), (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(ids: list[int], adapter_dir) -> torch.Tensor:
    """[len(ids), vocab] fp32 log_softmax of a plain transformers / PEFT forward over the prompt."""
    logits = peft_logits(tiny_model("llama"), adapter_dir, torch.tensor([ids]))[0]
    return torch.log_softmax(logits.float(), dim=-1)


def check(prompt_logprobs, ids: list[int], ref: torch.Tensor, k: int = K) -> None:
    """Every entry against the reference: the prompt token's logprob and rank, the top-k's logprobs, ranks
    and texts (ties within float noise may order differently: compared with a tolerance)."""
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(ids)
    assert prompt_logprobs[0] is None
    for i in range(1, len(ids)):
        entry, lp = prompt_logprobs[i], ref[i - 1]
        assert all(isinstance(v, Logprob) for v in entry.values())
        own, target = entry[ids[i]], lp[ids[i]].item()
        assert own.logprob == pytest.approx(target, abs=1e-4)
        assert int((lp > target + 1e-4).sum()) + 1 <= own.rank <= int((lp > target - 1e-4).sum()) + 1
        top = sorted((e for t, e in entry.items() if t != ids[i] or e.rank <= k), key=lambda e: e.rank)
        assert [e.rank for e in top] == list(range(1, k + 1))
        ref_top = lp.topk(k).values.tolist()
        for tid, e in entry.items():
            assert e.logprob == pytest.approx(lp[tid].item(), abs=1e-4)
            assert e.decoded_token == tokenizer().decode([tid])
        for e, val in zip(top, ref_top, strict=True):
            assert e.logprob == pytest.approx(val, abs=1e-4)


def run(engine, requests) -> dict:
    """requests: {id: (prompt ids, params, adapter)} -> {id: final RequestOutput}."""
    for rid, (ids, params, name) in requests.items():
        engine.add_request(rid, ids, params, name)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None
            if out.finished:
                final[out.request_id] = out
    return final


@pytest.mark.parametrize("chunk", [1024, 7], ids=["whole", "chunked"])
def test_prompt_logprobs_match_transformers_and_peft(adapter, chunk):
    engine = build_engine(
        tiny_model("llama"), tokenizer=tokenizer(), adapters={"a": adapter}, block_size=4,
        max_num_batched_tokens=chunk,
    )  # fmt: skip
    ids = [prompt(23, 0), prompt(17, 1)]
    reqs = {
        "base": (ids[0], ASK, None),
        "lora": (ids[1], ASK, "a"),
        "plain": (ids[0], GREEDY, None),
        "plain-lora": (ids[1], GREEDY, "a"),
    }
    out = run(engine, reqs)
    check(out["base"].prompt_logprobs, ids[0], reference(ids[0], None))
    check(out["lora"].prompt_logprobs, ids[1], reference(ids[1], adapter))
    assert out["plain"].prompt_logprobs is None and out["plain-lora"].prompt_logprobs is None
    # rows that ask do not change what rows that do not ask generate (and vice versa)
    assert out["plain"].outputs[0].token_ids == out["base"].outputs[0].token_ids
    assert out["plain-lora"].outputs[0].token_ids == out["lora"].outputs[0].token_ids
    alone = run(build_engine(tiny_model("llama"), tokenizer=tokenizer(), adapters={"a": adapter}), {
        "x": (ids[1], GREEDY, "a")})  # fmt: skip
    assert alone["x"].outputs[0].token_ids == out["plain-lora"].outputs[0].token_ids


def test_prefix_cached_blocks_are_not_used_for_prompt_logprobs(adapter):
    engine = build_engine(tiny_model("llama"), tokenizer=tokenizer(), adapters={"a": adapter}, block_size=4)
    ids = prompt(30, 2)
    run(engine, {"warm": (ids, GREEDY, "a")})
    hits = engine.stats()["prefix_cache_hits_total"]
    out = run(engine, {"ask": (ids, ASK, "a")})
    assert engine.stats()["prefix_cache_hits_total"] == hits  # computed its whole prompt
    check(out["ask"].prompt_logprobs, ids, reference(ids, adapter))
    again = run(engine, {"after": (ids, GREEDY, "a")})  # a request that does not ask still hits the cache
    assert engine.stats()["prefix_cache_hits_total"] > hits
    assert again["after"].outputs[0].token_ids == out["ask"].outputs[0].token_ids


def test_prompt_logprobs_zero_and_n_greater_than_one():
    engine = build_engine(tiny_model("llama"), tokenizer=tokenizer(), block_size=4)
    ids = prompt(9, 3)
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=5, n=3, prompt_logprobs=0)
    out = run(engine, {"r": (ids, params, None)})["r"]
    check(out.prompt_logprobs, ids, reference(ids, None), k=0)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])
    assert len(out.outputs) == 3


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True])
def test_prompt_logprobs_bounds(bad):
    with pytest.raises(SamplingParamError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)


# --- server: /v1/completions echo + logprobs, prompt_logprobs ----------------------------------------


@pytest.fixture(scope="module")
def http(adapter):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from blora.engine import AsyncLLM
    from blora.server import ServerConfig, create_app

    engine = AsyncLLM(tiny_model("llama"), tokenizer=tokenizer(), adapters={"a": str(adapter)}, block_size=4)
    with TestClient(create_app(engine, ServerConfig(served_model_name="base"))) as client:
        yield client


def completion(http, **body) -> dict:
    r = http.post("/v1/completions", json=dict(model="a", max_tokens=3, temperature=0, **body))
    assert r.status_code == 200, r.text
    return r.json()


def test_server_echo_with_logprobs(http, adapter):
    ids = prompt(12, 4)
    ref = reference(ids, adapter)
    choice = completion(http, prompt=ids, echo=True, logprobs=2)["choices"][0]
    plain = completion(http, prompt=ids, logprobs=2)["choices"][0]
    lp, gen = choice["logprobs"], plain["logprobs"]
    assert choice["text"] == tokenizer().decode(ids) + plain["text"]
    assert lp["tokens"] == [tokenizer().decode([t]) for t in ids] + gen["tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        top = ref[i - 1].topk(2)
        assert sorted(lp["top_logprobs"][i].values(), reverse=True) == pytest.approx(
            top.values.tolist(), abs=1e-4
        )
    assert lp["token_logprobs"][len(ids) :] == gen["token_logprobs"]
    assert lp["top_logprobs"][len(ids) :] == gen["top_logprobs"]
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets
    assert "prompt_logprobs" not in choice

    # streamed: the first chunk carries the prompt's logprobs, then the generated ones
    with http.stream(
        "POST",
        "/v1/completions",
        json=dict(model="a", prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=2, stream=True),
    ) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for c in chunks:
        for key in streamed:
            streamed[key] += (c["choices"][0]["logprobs"] or {}).get(key, [])
    assert streamed == {key: lp[key] for key in streamed}


def test_server_prompt_logprobs(http, adapter):
    ids = prompt(10, 5)
    ref = reference(ids, adapter)
    choice = completion(http, prompt=ids, prompt_logprobs=3)["choices"][0]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for i in range(1, len(ids)):
        entry = entries[i]
        own = entry[str(ids[i])]
        assert own["logprob"] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        assert own["decoded_token"] == tokenizer().decode([ids[i]])
        assert {e["rank"] for t, e in entry.items() if t != str(ids[i]) or e["rank"] <= 3} == {1, 2, 3}
    assert choice["logprobs"] is None

    chat = http.post(
        "/v1/chat/completions",
        json=dict(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=2, prompt_logprobs=1),
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["prompt_logprobs"][0] is None and len(chat.json()["prompt_logprobs"]) > 1


@pytest.mark.parametrize(
    "body",
    [dict(prompt_logprobs=21), dict(prompt_logprobs=-1), dict(prompt_logprobs=2, stream=True)],
    ids=["above-20", "negative", "streamed"],
)
def test_server_refuses_bad_prompt_logprobs(http, body):
    r = http.post("/v1/completions", json=dict(model="a", prompt="hi", max_tokens=2, **body))
    assert r.status_code == 400, r.text
    assert "prompt_logprobs" in r.text


def test_prompt_logprobs_survive_preemption(adapter):
    """Little KV memory: sequences are preempted and recomputed; every entry once, right."""
    engine = build_engine(
        tiny_model("llama"), tokenizer=tokenizer(), adapters={"a": adapter}, block_size=4, num_kv_blocks=14,
        max_num_batched_tokens=8,
    )  # fmt: skip
    ids = [prompt(21, 10 + i) for i in range(4)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    out = run(engine, {str(i): (p, params, "a" if i % 2 else None) for i, p in enumerate(ids)})
    assert engine.stats()["num_preemptions_total"] > 0
    for i, p in enumerate(ids):
        check(out[str(i)].prompt_logprobs, p, reference(p, adapter if i % 2 else None), k=2)
