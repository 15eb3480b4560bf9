"""HTTP layer of the OpenAI server against a scripted fake engine: protocol shapes, validation, errors.

The fake stands in for ``AsyncLLM`` so these tests pin the HTTP contract quickly and exactly (which
requests reach the engine, with which SamplingParams). End-to-end behaviour against the real engine in a
real server process is in ``test_server_e2e.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from blora.engine.client import EngineClient, EngineLimits  # noqa: E402
from blora.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput  # noqa: E402
from blora.engine.structured import StructuredOutputs  # noqa: E402
from blora.models import default_model_dir  # noqa: E402
from blora.server import ServerConfig, create_app  # noqa: E402

BASE = "tiny-base"
SCRIPT = " the quick brown fox jumps over the lazy dog and keeps running far away"


class FakeEngine:
    """Emits a fixed script (shifted per adapter and per choice), one token per step. An ``EngineClient``
    that cannot replace adapters in place."""

    max_model_len = 64

    def __init__(self, tokenizer, adapters: dict[str, str] | None = None, step_s: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.adapters = dict(adapters or {})
        self.step_s = step_s
        self.calls: list[tuple] = []
        self.aborted: list[str] = []
        self.active: dict[str, str | None] = {}
        self.script = tokenizer.encode(SCRIPT)

    @property
    def limits(self) -> EngineLimits:
        vocab = len(self.tokenizer)
        return EngineLimits(self.max_model_len, vocab, max_loras=16, replace_adapters=False)

    @property
    def structured_outputs(self) -> StructuredOutputs:
        if not hasattr(self, "_structured"):
            self._structured = StructuredOutputs(self.tokenizer, len(self.tokenizer), [])
        return self._structured

    def list_adapters(self) -> dict[str, str]:
        return dict(self.adapters)

    def adapter_source(self, name: str) -> str | None:
        return self.adapters.get(name)

    async def load_adapter(self, name: str, path: str, replace: bool = False, wait: bool = False) -> None:
        if not (Path(path) / "adapter_model.safetensors").is_file():
            raise ValueError(f"{path}: no adapter_model.safetensors")
        self.adapters[name] = str(path)

    async def unload_adapter(self, name: str, wait: bool = False) -> None:
        del self.adapters[name]

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        pass

    def stats(self) -> dict:
        running = list(self.active.values())
        return dict(
            num_running=len(running),
            num_waiting=0,
            kv_usage=0.25 if running else 0.0,
            running_adapters=[a for a in running if a],
            waiting_adapters=[],
            prompt_tokens_total=7,
            generation_tokens_total=11,
        )

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return self.active.pop(request_id, None) is not None

    async def generate(self, prompt, sampling_params, adapter=None, request_id=None):
        sp = sampling_params
        self.calls.append((prompt, sp, adapter, request_id))
        if len(prompt) + (sp.max_tokens or 0) > 64:
            raise ValueError("prompt + max_tokens exceed max_model_len")
        self.active[request_id] = adapter
        shift = 1 if adapter else 0
        seqs = [self.script[shift + j :] for j in range(sp.n)]
        done = [None] * sp.n
        outs = [
            CompletionOutput(j, "", [], logprobs=[] if sp.logprobs is not None else None) for j in range(sp.n)
        ]
        sent: dict[int, tuple[int, int]] = {}
        try:
            for step in range(sp.max_tokens):
                await asyncio.sleep(self.step_s)
                for j, out in enumerate(outs):
                    if done[j]:
                        continue
                    tid = seqs[j][step % len(seqs[j])]
                    out.token_ids.append(tid)
                    out.text = self.tokenizer.decode(out.token_ids)
                    if out.logprobs is not None:
                        out.logprobs.append({tid: -0.5, tid + 1: -1.5, tid + 2: -2.5})
                    hit = next((s for s in sp.stop_strings if s in out.text), None)
                    if hit:
                        out.text = out.text[: out.text.index(hit)]
                        done[j] = out.finish_reason = "stop"
                    elif step + 1 == sp.max_tokens:
                        done[j] = out.finish_reason = "length"
                finished = all(done)
                emitted = [with_increment(out, sent) for out in outs]
                yield RequestOutput(
                    request_id, None, list(prompt), emitted, finished, adapter, RequestMetrics(0.0)
                )
        finally:
            self.active.pop(request_id, None)


def with_increment(out: CompletionOutput, sent: dict[int, tuple[int, int]]) -> CompletionOutput:
    """A copy of ``out`` whose ``delta_*`` fields hold what is new since its previous copy, as the engine
    emits them; ``sent``: (characters, tokens) emitted so far per choice."""
    chars, tokens = sent.get(out.index, (0, 0))
    sent[out.index] = (len(out.text), len(out.token_ids))
    logprobs = None if out.logprobs is None else list(out.logprobs)
    return dataclasses.replace(
        out,
        token_ids=list(out.token_ids),
        logprobs=logprobs,
        delta_text=out.text[chars:],
        delta_token_ids=out.token_ids[tokens:],
        delta_logprobs=None if logprobs is None else logprobs[tokens:],
    )


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir())


def make_client(tokenizer, tmp_path=None, **overrides):
    engine = overrides.pop("engine", None) or FakeEngine(tokenizer, {"sql": "/adapters/sql"})
    config = ServerConfig(served_model_name=BASE, model_source="/models/base", max_num_seqs=2, max_queue=2)
    for key, value in overrides.items():
        setattr(config, key, value)
    return TestClient(create_app(engine, config)), engine


def test_the_fake_is_an_engine_client(tokenizer):
    assert isinstance(FakeEngine(tokenizer), EngineClient)


@pytest.fixture
def client(tokenizer):
    c, engine = make_client(tokenizer)
    with c:
        c.engine = engine
        yield c


def sse_events(resp) -> list:
    lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def assert_error(resp, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# --- models, completions, chat ---------------------------------------------------------------------


def test_models_lists_base_and_adapters(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    cards = {m["id"]: m for m in data["data"]}
    assert cards[BASE]["parent"] is None and cards[BASE]["root"] == "/models/base"
    assert cards["sql"]["parent"] == BASE and cards["sql"]["root"] == "/adapters/sql"
    assert client.get("/v1/models/sql").json()["id"] == "sql"
    assert_error(client.get("/v1/models/nope"), 404)


def test_completion_routes_model_to_adapter_and_params(client):
    body = {"model": "sql", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "seed": 3, "top_p": 0.5}
    r = client.post("/v1/completions", json=body | {"presence_penalty": 0.5, "frequency_penalty": -0.5})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-") and data["model"] == "sql"
    (choice,) = data["choices"]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert data["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
    prompt, sp, adapter, _ = client.engine.calls[-1]
    assert adapter == "sql" and prompt == client.engine.tokenizer.encode("Hello")
    assert (sp.temperature, sp.seed, sp.top_p, sp.max_tokens) == (0, 3, 0.5, 5)
    assert (sp.presence_penalty, sp.frequency_penalty) == (0.5, -0.5)
    base = client.post("/v1/completions", json=body | {"model": BASE}).json()
    assert client.engine.calls[-1][2] is None
    assert base["choices"][0]["text"] != choice["text"]


def test_completion_stop_and_n_and_multiple_prompts(client):
    r = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 10, "stop": " fox"})
    choice = r.json()["choices"][0]
    assert choice["text"] == " the quick brown" and choice["finish_reason"] == "stop"
    assert client.engine.calls[-1][1].stop_strings == (" fox",)
    r = client.post("/v1/completions", json={"model": BASE, "prompt": ["a", "b c"], "n": 2, "max_tokens": 3})
    data = r.json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert data["choices"][0]["text"] != data["choices"][1]["text"]
    assert data["usage"]["prompt_tokens"] == 1 + 2 and data["usage"]["completion_tokens"] == 12
    r = client.post("/v1/completions", json={"model": BASE, "prompt": [[9, 10, 11], [12]], "max_tokens": 2})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert [call[0] for call in client.engine.calls[-2:]] == [[9, 10, 11], [12]]
    r = client.post("/v1/completions", json={"model": BASE, "prompt": [9, 10], "max_tokens": 2})
    assert r.json()["usage"]["prompt_tokens"] == 2 and client.engine.calls[-1][0] == [9, 10]


def test_completion_stream_matches_non_stream(client):
    body = {"model": "sql", "prompt": "Hello", "max_tokens": 6}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert len({e["id"] for e in events}) == 1
    assert "".join(e["choices"][0]["text"] for e in events) == full
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e.get("usage") is None for e in events)


def test_stream_include_usage_sends_final_usage_chunk(client):
    body = {"model": BASE, "prompt": "Hello", "max_tokens": 4, "n": 2, "stream": True}
    with client.stream(
        "POST", "/v1/completions", json=body | {"stream_options": {"include_usage": True}}
    ) as r:
        events = sse_events(r)
    last = events[-1]
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 8,
        "total_tokens": 9,
    }
    finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["length", "length"]


def test_completion_logprobs(client):
    r = client.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 3, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert client.engine.calls[-1][1].logprobs == 2
    assert lp["token_logprobs"] == [-0.5] * 3 and len(lp["tokens"]) == 3
    assert all(len(t) == 2 and max(t.values()) == -0.5 for t in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    assert "".join(lp["tokens"]) == r.json()["choices"][0]["text"]


def test_chat_applies_template_and_streams_role_first(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.post("/v1/chat/completions", json={"model": "sql", "messages": msgs, "max_tokens": 4})
    data = r.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["message"]["role"] == "assistant" and data["choices"][0]["message"]["content"]
    tok = client.engine.tokenizer
    expected = tok.encode(
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    assert client.engine.calls[-1][0] == expected
    body = {
        "model": "sql",
        "messages": msgs,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse_events(r)
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == data["choices"][0]["message"]["content"]
    assert events[-1]["usage"]["completion_tokens"] == 4


def test_chat_default_max_tokens_fills_context_and_logprobs(client):
    msgs = [{"role": "user", "content": "Hi"}]
    body = {"model": BASE, "messages": msgs, "logprobs": True, "top_logprobs": 2, "max_completion_tokens": 2}
    r = client.post("/v1/chat/completions", json=body)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and content[0]["logprob"] == -0.5 and len(content[0]["top_logprobs"]) == 2
    assert isinstance(content[0]["bytes"], list)
    client.post("/v1/chat/completions", json={"model": BASE, "messages": msgs})
    prompt, sp, _, _ = client.engine.calls[-1]
    assert sp.max_tokens == FakeEngine.max_model_len - len(prompt)


# --- errors ------------------------------------------------------------------------------------------


def test_malformed_bodies_never_reach_engine(client):
    bad = [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"prompt": "hi"}).encode(), "model"),
        (json.dumps({"model": BASE}).encode(), "prompt"),
        (json.dumps({"model": BASE, "prompt": "hi", "max_tokens": "lots"}).encode(), "max_tokens"),
        (json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"model": BASE, "prompt": "hi", "temperature": 3}).encode(), "temperature"),
        (json.dumps({"model": BASE, "prompt": "hi", "top_p": 0}).encode(), "top_p"),
        (json.dumps({"model": BASE, "prompt": "hi", "n": 0}).encode(), "n"),
        (json.dumps({"model": BASE, "prompt": "hi", "logprobs": 99}).encode(), "logprobs"),
        (json.dumps({"model": BASE, "prompt": "hi", "presence_penalty": 5}).encode(), "presence_penalty"),
        (json.dumps({"model": BASE, "prompt": "hi", "stop": [""]}).encode(), "stop"),
        (json.dumps({"model": BASE, "prompt": []}).encode(), "prompt"),
        (json.dumps({"model": BASE, "prompt": "hi", "logit_bias": {"1": 500}}).encode(), "logit_bias"),
        (
            json.dumps({"model": BASE, "prompt": "hi", "stream_options": {"include_usage": True}}).encode(),
            None,
        ),
        (json.dumps({"model": BASE, "prompt": [123456789]}).encode(), "prompt"),
    ]
    for body, param in bad:
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        err = assert_error(r, 400, param)
        assert err["type"] == "invalid_request_error"
    chat_bad = [
        {"model": BASE, "messages": []},
        {"model": BASE, "messages": [{"role": "wizard", "content": "x"}]},
        {"model": BASE, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        {"model": BASE, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
    ]
    for body in chat_bad:
        assert_error(client.post("/v1/chat/completions", json=body), 400)
    assert client.engine.calls == []
    r = client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert "not valid JSON" in r.json()["error"]["message"]


def test_unknown_model_is_404(client):
    err = assert_error(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found"
    assert_error(
        client.post(
            "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
        ),
        404,
    )
    assert client.engine.calls == []


def test_context_length_exceeded_is_400(client):
    r = client.post("/v1/completions", json={"model": BASE, "prompt": "x " * 40, "max_tokens": 30})
    err = assert_error(r, 400, "max_tokens", "context_length_exceeded")
    assert "maximum context length is 64" in err["message"]
    r = client.post(
        "/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": "x " * 70}]}
    )
    assert_error(r, 400, "max_tokens")
    assert client.engine.calls == []


def test_engine_value_error_is_400(tokenizer):
    engine = FakeEngine(tokenizer)
    engine.max_model_len = 4096  # passes the server's check; the fake refuses > 64 tokens with a ValueError
    c, _ = make_client(tokenizer, engine=engine)
    with c:
        r = c.post("/v1/completions", json={"model": BASE, "prompt": "x " * 40, "max_tokens": 60})
        assert_error(r, 400)
        r = c.post(
            "/v1/completions", json={"model": BASE, "prompt": "x " * 40, "max_tokens": 60, "stream": True}
        )
        assert_error(r, 400)
        assert c.app.state.lifecycle.in_flight == 0


def test_api_key(tokenizer):
    c, engine = make_client(tokenizer, api_key="s3cret")
    with c:
        body = {"model": BASE, "prompt": "x", "max_tokens": 1}
        assert_error(c.post("/v1/completions", json=body), 401, code="invalid_api_key")
        assert_error(c.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": b"Bearer s3cr\xe9t"}), 401)
        assert_error(
            c.post("/v1/completions", content=b"{bad", headers={"Authorization": "Basic s3cret"}), 401
        )
        assert engine.calls == []
        ok = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_queue_full_is_429_with_retry_after(client):
    lifecycle = client.app.state.lifecycle
    assert lifecycle.capacity == 4
    held = [lifecycle.admit(f"held-{i}") for i in range(4)]
    r = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1})
    assert_error(r, 429, code="queue_full")
    assert r.headers["retry-after"] == "1"
    assert client.engine.calls == []
    held[0].release()
    assert (
        client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1}).status_code
        == 200
    )
    for t in held:
        t.release()


def test_draining_is_503(client):
    client.app.state.lifecycle.draining = True
    assert_error(
        client.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 503, code="shutting_down"
    )
    assert_error(client.get("/v1/models"), 503)
    assert client.get("/health").status_code == 503
    assert "blora:server_draining" in client.get("/metrics").text
    client.app.state.lifecycle.draining = False


def test_request_size_limits(client):
    r = client.post("/v1/completions", content=b"{}", headers={"content-length": str(64 << 20)})
    assert_error(r, 413, code="body_too_large")
    r = client.post("/v1/completions", json={"model": BASE, "prompt": ["x"] * 200, "n": 2})
    assert_error(r, 400, "n")
    assert client.engine.calls == []


def test_unknown_route_and_method_use_error_shape(client):
    assert_error(client.get("/v1/nope"), 404)
    assert_error(client.get("/v1/completions"), 405)


# --- runtime adapters ------------------------------------------------------------------------------


def make_adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def test_runtime_adapters_disabled_by_default(client):
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a"})
    assert_error(r, 404, code="runtime_adapters_disabled")
    assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}), 404)


def test_runtime_adapter_paths_confined_to_root(tokenizer, tmp_path):
    root = tmp_path / "root"
    make_adapter(root / "good")
    outside = make_adapter(tmp_path / "outside")
    (root / "escape").symlink_to(outside)
    (root / "nested").mkdir()
    (root / "nested" / "link").symlink_to("../../outside")
    (root / "inside_link").symlink_to(root / "good")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{}")
    c, engine = make_client(tokenizer, adapter_root=root, allow_runtime_adapters=True)
    with c:
        load = lambda name, path: c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})  # noqa: E731
        assert_error(load("x", "../outside"), 400, "lora_path")
        assert_error(load("x", "good/../../outside"), 400, "lora_path")
        assert_error(load("x", str(outside)), 400, "lora_path")
        assert_error(load("x", "escape"), 400, "lora_path")
        assert_error(load("x", "nested/link"), 400, "lora_path")
        assert_error(load("x", "/etc"), 400, "lora_path")
        assert_error(load("x", "missing"), 404, "lora_path")
        assert_error(load("x", "nested"), 400, "lora_path")  # exists, but not an adapter
        assert_error(load("x", "broken"), 400, code="adapter_load_failed")  # engine refuses it
        assert_error(load("../x", "good"), 400, "lora_name")
        assert_error(load(BASE, "good"), 400, "lora_name")
        assert_error(load("sql", "good"), 400, code="adapter_exists")
        assert "x" not in engine.adapters
        assert load("g", "good").status_code == 200
        assert load("g2", str(root / "good")).status_code == 200
        assert load("g3", "inside_link").status_code == 200
        assert engine.adapters["g"] == str((root / "good").resolve())
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert {"g", "g2", "g3", "sql"} <= set(ids)
        r = c.post("/v1/completions", json={"model": "g", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and engine.calls[-1][2] == "g"
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "g"}).status_code == 200
        assert_error(c.post("/v1/unload_lora_adapter", json={"lora_name": "g"}), 404)
        assert_error(c.post("/v1/completions", json={"model": "g", "prompt": "x"}), 404)
        metrics = c.get("/metrics").text
        assert 'blora:adapter_loads_total{model_name="tiny-base",outcome="failure"} 12.0' in metrics


# --- metrics -----------------------------------------------------------------------------------------


def test_metrics_move(client):
    before = client.get("/metrics").text
    assert "blora:num_requests_running" in before and "blora:kv_cache_usage_perc" in before
    client.post("/v1/completions", json={"model": "sql", "prompt": "x", "max_tokens": 3})
    with client.stream(
        "POST", "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 3, "stream": True}
    ) as r:
        sse_events(r)
    text = client.get("/metrics").text
    for name in (
        "blora:time_to_first_token_seconds_count",
        "blora:inter_token_latency_seconds_count",
        "blora:e2e_request_latency_seconds_count",
        "blora:request_time_per_output_token_seconds_count",
    ):
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert float(line.split()[-1]) >= 1, line
    assert 'blora:request_success_total{finished_reason="length",model_name="tiny-base"} 2.0' in text
    assert 'blora:prompt_tokens_total{model_name="tiny-base"} 7.0' in text
    assert "blora:lora_requests_info{" in text and 'max_lora="16"' in text  # EngineLimits.max_loras
    assert 'blora:server_requests_in_flight{model_name="tiny-base"} 0.0' in text


def test_sampling_params_reach_engine_validated(client):
    body = {
        "model": BASE,
        "prompt": "x",
        "max_tokens": 2,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.2,
    }
    assert (
        client.post("/v1/completions", json=body | {"ignore_eos": True, "stop_token_ids": [7]}).status_code
        == 200
    )
    sp = client.engine.calls[-1][1]
    assert (sp.top_k, sp.min_p, sp.repetition_penalty, sp.ignore_eos, sp.stop_token_ids) == (
        5,
        0.1,
        1.2,
        True,
        [7],
    )
    assert_error(client.post("/v1/completions", json=body | {"top_k": -5}), 400)


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_resolve_adapter_path_unit(tmp_path):
    from blora.server.adapters import resolve_adapter_path
    from blora.server.errors import InvalidRequestError, NotFoundError

    root = tmp_path / "r"
    make_adapter(root / "a" / "b")
    assert resolve_adapter_path(root, "a/b") == (root / "a" / "b").resolve()
    with pytest.raises(InvalidRequestError):
        resolve_adapter_path(root, "a/../a/b")
    with pytest.raises(NotFoundError):
        resolve_adapter_path(root, "a/c")


def test_cli_arguments(tmp_path):
    import argparse

    from blora.server.options import add_serve_arguments, check_args

    parser = add_serve_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--lora-modules", "a=/x", "b=/y=z", "--max-queue", "-1", "--port", "9"])
    assert args.lora_modules == [("a", "/x"), ("b", "/y=z")] and args.max_queue == -1 and args.model is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-modules", "nameonly"])
    with pytest.raises(SystemExit, match="needs --adapter-root"):
        check_args(parser.parse_args(["--allow-runtime-adapters"]))
    with pytest.raises(SystemExit, match="duplicate"):
        check_args(parser.parse_args(["--lora-modules", "a=/x", "a=/y"]))
    with pytest.raises(SystemExit, match="not a directory"):
        check_args(parser.parse_args(["--adapter-root", str(tmp_path / "nope")]))
    check_args(parser.parse_args(["--adapter-root", str(tmp_path), "--allow-runtime-adapters"]))


def test_adapter_mixture_extension(tokenizer):
    engine = FakeEngine(tokenizer, {"sql": "/a/sql", "chat": "/a/chat"})
    c, _ = make_client(tokenizer, engine=engine)
    with c:
        mix = {"sql": 0.7, "chat": 0.3}
        r = c.post(
            "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2, "adapter_mixture": mix}
        )
        assert r.status_code == 200, r.text
        assert engine.calls[-1][2] == mix
        msgs = [{"role": "user", "content": "hi"}]
        body = {"model": BASE, "messages": msgs, "max_tokens": 2, "adapter_mixture": mix, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            sse_events(r)
        assert engine.calls[-1][2] == mix
        n_calls = len(engine.calls)
        bad = [
            ({"model": "sql", "adapter_mixture": mix}, 400, "model"),
            ({"model": BASE, "adapter_mixture": {"sql": 1, "nope": 1}}, 404, "adapter_mixture"),
            ({"model": BASE, "adapter_mixture": {}}, 400, "adapter_mixture"),
            ({"model": BASE, "adapter_mixture": {"sql": "heavy"}}, 400, "adapter_mixture"),
            ({"model": BASE, "adapter_mixture": {f"a{i}": 1 for i in range(17)}}, 400, "adapter_mixture"),
        ]
        for extra, status, param in bad:
            assert_error(c.post("/v1/completions", json={"prompt": "x", **extra}), status, param)
        r = c.post(
            "/v1/completions",
            content=b'{"model": "tiny-base", "prompt": "x", "adapter_mixture": {"sql": NaN}}',
            headers={"content-type": "application/json"},
        )
        assert_error(r, 400)
        assert len(engine.calls) == n_calls
