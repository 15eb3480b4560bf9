"""vLLM drop-in surface, in process: ``blora serve`` flags, /tokenize, /detokenize, /ping, X-Request-Id,
load_lora_adapter with load_inplace, adapters served by name from the root, vLLM metric names, and
``LoRARequest`` in the Python API. A real ``AsyncLLM`` over a tiny Llama; adapters with non-zero B.
The documented vLLM recipe run as a separate server process is in ``test_vllm_compat_recipe.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from blora.engine import LLM, AsyncLLM, LoRARequest, SamplingParams  # noqa: E402
from blora.server import ServerConfig, create_app  # noqa: E402
from blora.server.options import UNSUPPORTED_VLLM_FLAGS, add_serve_arguments, check_args, server_config  # noqa: E402
from tests.helpers import make_adapter, save_tiny_model, tiny_model  # noqa: E402

BASE = "tiny"
GREEDY = {"temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("compat")
    model_dir = save_tiny_model("llama", d / "model")
    model = tiny_model("llama")
    root = d / "root"
    out = {"model": model_dir, "root": root}
    for i, name in enumerate(["sql", "chat", "other"]):
        out[name] = make_adapter(model, root / name, seed=10 + i, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])  # fmt: skip
    out["rank16"] = make_adapter(
        model, root / "rank16", seed=20, r=16, lora_alpha=16, target_modules=["q_proj"]
    )
    outside = make_adapter(model, d / "outside", seed=30, r=4, lora_alpha=8, target_modules=["q_proj"])
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return out


@pytest.fixture(scope="module")
def engine(files, one_thread):
    llm = AsyncLLM(str(files["model"]), adapters={"sql": str(files["sql"])}, dtype="float32", max_loras=4)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def reference(files):
    """Greedy texts from the offline LLM (base, sql, chat, other) for the same prompt."""
    llm = LLM(str(files["model"]), dtype="float32", max_loras=4)
    for name in ("sql", "chat", "other"):
        llm.load_adapter(name, files[name])
    params = SamplingParams(**GREEDY)
    names = [None, "sql", "chat", "other"]
    outs = llm.generate(["Hello there"] * 4, params, adapters=names)
    return {name: o.outputs[0].text for name, o in zip(names, outs, strict=True)}


@pytest.fixture(scope="module")
def client(engine, files):
    config = ServerConfig(
        served_model_name=BASE,
        served_model_aliases=("tiny-alias",),
        model_source=str(files["model"]),
        adapter_root=files["root"],
        allow_runtime_adapters=True,
        shutdown_engine=False,
    )
    with TestClient(create_app(engine, config)) as c:
        yield c


def complete(client, model: str, **extra):
    body = {"model": model, "prompt": "Hello there", **GREEDY, **extra}
    return client.post("/v1/completions", json=body)


# --- flags ------------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(list(argv))
    check_args(args)
    return args


def test_positional_model_and_vllm_lora_flags(files, tmp_path):
    spec = json.dumps({"name": "sql", "path": str(files["sql"]), "base_model_name": str(files["model"])})
    args = parse(str(files["model"]), "--enable-lora", "--lora-modules", spec, f"chat={files['chat']}",
                 "--max-lora-rank", "8", "--max-cpu-loras", "32", "--served-model-name", "a", "b")  # fmt: skip
    assert args.model == str(files["model"])
    assert dict(args.lora_modules) == {"sql": str(files["sql"]), "chat": str(files["chat"])}
    assert args.lora_modules[0].base_model_name == str(files["model"])
    config = server_config(args)
    assert config.served_model_name == "a" and config.served_model_aliases == ("b",)
    assert parse("--model", "m").model == "m"  # --model keeps working


@pytest.mark.parametrize(
    "argv, message",
    [
        (["m", "--model", "n"], "given twice"),
        (["--lora-modules", '{"name": "x"}'], '"name" and "path"'),
        (["--lora-modules", '{"name": "x", "path": "/p", "extra": 1}'], "unknown keys"),
        (
            ["m", "--lora-modules", '{"name": "x", "path": "/p", "base_model_name": "other"}'],
            "base_model_name",
        ),
        (["--max-cpu-loras", "2", "--max-loras", "4"], "at least --max-loras"),
        (["--chat-template", "no-such-file.jinja"], "neither a file nor a Jinja template"),
        (["--ssl-keyfile", "k.pem"], "go together"),
        (["--generation-config", "/nonexistent"], "generation_config.json"),
        (["--root-path", "api"], "must start with '/'"),
    ],
)
def test_bad_flags_exit_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert message in str(exc.value) + capsys.readouterr().err


def test_known_vllm_flags_we_do_not_implement_say_so(capsys):
    assert len(UNSUPPORTED_VLLM_FLAGS) > 20
    for flag in ("--tensor-parallel-size", "--gpu-memory-utilization", "--enforce-eager"):
        with pytest.raises(SystemExit) as exc:
            parse("m", flag, "2") if flag != "--enforce-eager" else parse("m", flag)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"{flag} is a vLLM option that blora does not implement" in err
    with pytest.raises(SystemExit):
        parse("m", "--no-such-flag")
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_chat_template_file_or_inline_and_generation_config(files, tmp_path):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    assert parse("--chat-template", str(tmp_path / "t.jinja")).chat_template == template
    assert parse("--chat-template", template).chat_template == template
    from blora.server.options import generation_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 7, "max_new_tokens": 5, "do_sample": True}))  # fmt: skip
    assert generation_defaults(str(tmp_path), None) == {"temperature": 0.3, "top_k": 7, "max_tokens": 5}
    assert generation_defaults("auto", str(tmp_path)) == {"temperature": 0.3, "top_k": 7, "max_tokens": 5}
    assert generation_defaults("vllm", str(tmp_path)) == {}
    (tmp_path / "model.gguf").write_bytes(b"GGUF")  # a .gguf file: its directory's generation_config.json
    assert generation_defaults("auto", str(tmp_path / "model.gguf"))["top_k"] == 7
    assert generation_defaults("auto", "no-such-org/no-such-model") == {}  # not in the local cache


def test_tokenizer_revision_and_chat_template_reach_the_engine(files):
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    llm = LLM(str(files["model"]), tokenizer=str(files["model"]), revision="main", chat_template=template,
              dtype="float32", num_kv_blocks=16)  # fmt: skip
    assert llm.tokenizer.chat_template == template
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "[user]hi"


# --- endpoints --------------------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip(client, engine):
    tok = engine.tokenizer
    r = client.post("/tokenize", json={"model": BASE, "prompt": "Hello there", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("Hello there") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.max_model_len
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    r = client.post("/detokenize", json={"model": BASE, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": "Hello there"}


def test_tokenize_chat_uses_the_chat_template(client, engine):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    r = client.post("/tokenize", json={"model": "sql", "messages": messages})
    assert r.status_code == 200, r.text
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert r.json()["tokens"] == engine.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/tokenize", {"prompt": "x" * 10_000_000}, 400, "prompt"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
            400,
            "continue_final_message",
        ),  # fmt: skip
    ],
)
def test_tokenize_refusals(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_ping_and_request_id(client):
    assert client.get("/ping").status_code == 200 and client.post("/ping").status_code == 200
    r = complete(client, BASE, stream=False)
    assert r.status_code == 200 and "x-request-id" not in r.headers
    r = client.post("/v1/completions", json={"model": BASE, "prompt": "Hi", **GREEDY},
                    headers={"X-Request-Id": "trace-42"})  # fmt: skip
    assert r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "cmpl-trace-42"
    with client.stream("POST", "/v1/chat/completions", headers={"X-Request-Id": "trace-43"},
                       json={"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "stream": True, **GREEDY}) as s:  # fmt: skip
        assert s.headers["x-request-id"] == "trace-43"
        assert '"id":"chatcmpl-trace-43"' in "".join(s.iter_text())
    r = client.get("/v1/models", headers={"X-Request-Id": "m-1"})  # every response echoes it
    assert r.headers["x-request-id"] == "m-1"
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"X-Request-Id": "e-1"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "e-1"
    r = client.get("/v1/models", headers={"X-Request-Id": "x" * 300})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"


def test_same_request_id_twice_at_once_does_not_collide(client):
    body = {"model": BASE, "prompt": "Hello", "temperature": 0, "max_tokens": 20}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda _: client.post("/v1/completions", json=body, headers={"X-Request-Id": "dup"}), range(4)))  # fmt: skip
    assert [r.status_code for r in rs] == [200] * 4
    assert len({r.json()["choices"][0]["text"] for r in rs}) == 1


def test_served_model_aliases(client, reference):
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert models[:2] == [BASE, "tiny-alias"] and "sql" in models
    assert complete(client, "tiny-alias").json()["choices"][0]["text"] == reference[None]


def test_adapter_served_by_name_from_the_root(client, reference):
    assert "chat" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    r = complete(client, "chat")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference["chat"] != reference[None]
    assert "chat" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    for name in ("escape", "../outside", "missing"):  # symlink out of the root, traversal, not there
        r = complete(client, name)
        assert r.status_code == 404, (name, r.text)
        assert r.json()["error"]["param"] == "model"


def test_load_inplace_replaces_under_traffic(client, files, reference):
    # "other" is first loaded under the name "swap", then replaced in place by "chat" while requests run
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(files["other"])})
    assert r.status_code == 200, r.text
    assert complete(client, "swap").json()["choices"][0]["text"] == reference["other"]
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(files["chat"])})
    assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"]
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": "swap", "prompt": "Hello there", "temperature": 0, "max_tokens": 6}
    with ThreadPoolExecutor(6) as pool:
        running = [pool.submit(client.post, "/v1/completions", json=body) for _ in range(5)]
        swap = pool.submit(client.post, "/v1/load_lora_adapter",
                           json={"lora_name": "swap", "lora_path": str(files["chat"]), "load_inplace": True})  # fmt: skip
        results = [f.result() for f in running]
        assert swap.result().status_code == 200, swap.result().text
    assert "replaced" in swap.result().text
    texts = {r.json()["choices"][0]["text"] for r in results}
    assert all(r.status_code == 200 for r in results) and texts <= {reference["other"], reference["chat"]}
    assert complete(client, "swap").json()["choices"][0]["text"] == reference["chat"]


# --- metrics ----------------------------------------------------------------------------------------


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_vllm_metric_names_labels_and_phases(client):
    before = client.get("/metrics").text
    n0 = sample(before, "vllm:request_success_total", finished_reason="length")
    assert complete(client, "sql").status_code == 200
    text = client.get("/metrics").text
    assert sample(text, "vllm:request_success_total", model_name=BASE, engine="0", finished_reason="length") == n0 + 1  # fmt: skip
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:num_preemptions_total", "blora:num_preemptions_total"):  # fmt: skip
        sample(text, name, model_name=BASE)
    for phase in ("queue", "prefill", "decode", "inference"):
        for prefix in ("vllm", "blora"):
            assert sample(text, f"{prefix}:request_{phase}_time_seconds_count", model_name=BASE) >= 1
    assert sample(text, "vllm:request_decode_time_seconds_sum") > 0
    assert sample(text, "vllm:request_inference_time_seconds_sum") >= sample(text, "vllm:request_decode_time_seconds_sum")  # fmt: skip
    # vLLM's buckets: e2e latency starts at 0.3 s, ttft at 1 ms
    assert 'vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="tiny"}' in text
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny"}' in text
    assert sample(text, "vllm:request_params_max_tokens_count") >= 1
    assert sample(text, "vllm:time_per_output_token_seconds_count") >= 1
    info = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and 'max_lora=""' not in info[0]
    assert set(re.findall(r'(\w+)="', info[0])) == {
        "max_lora",
        "running_lora_adapters",
        "waiting_lora_adapters",
    }


def test_lora_requests_info_shows_the_running_adapter(engine, files):
    async def scenario() -> str:
        config = ServerConfig(served_model_name=BASE, max_loras=4, shutdown_engine=False)
        app = create_app(engine, config)
        stream = engine.generate(
            "Hello", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), adapter="sql"
        )
        await anext(stream)
        await asyncio.sleep(0.05)
        text = app.state.metrics.render().decode()
        await stream.aclose()
        return text

    text = asyncio.run(scenario())
    assert 'running_lora_adapters="sql"' in text and 'max_lora="4"' in text


@pytest.mark.parametrize(
    "names, present, absent", [("vllm", "vllm:", "blora:e2e"), ("blora", "blora:", "vllm:")]
)
def test_metric_names_flag(engine, names, present, absent):
    app = create_app(engine, ServerConfig(served_model_name=BASE, metric_names=names, shutdown_engine=False))
    with TestClient(app) as c:
        assert c.post("/v1/completions", json={"model": BASE, "prompt": "Hi", **GREEDY}).status_code == 200
        text = c.get("/metrics").text
    assert present + "e2e_request_latency_seconds_count" in text and absent not in text


# --- Python API: LoRARequest ------------------------------------------------------------------------


def test_lora_request_in_llm_generate_and_chat(files, reference):
    llm = LLM(str(files["model"]), dtype="float32", max_loras=4)
    sql, chat = LoRARequest("sql", 1, str(files["sql"])), LoRARequest("chat", 2, str(files["chat"]))
    outs = llm.generate(["Hello there"] * 3, SamplingParams(**GREEDY), lora_request=[sql, None, chat])
    assert [o.outputs[0].text for o in outs] == [reference["sql"], reference[None], reference["chat"]]
    assert [o.adapter for o in outs] == ["sql", None, "chat"]
    one = llm.generate("Hello there", SamplingParams(**GREEDY), lora_request=sql)  # reused, not reloaded
    assert one[0].outputs[0].text == reference["sql"]
    msgs = [{"role": "user", "content": "Hi"}]
    by_request = llm.chat(msgs, SamplingParams(**GREEDY), lora_request=chat)[0].outputs[0].text
    assert by_request == llm.chat(msgs, SamplingParams(**GREEDY), adapters="chat")[0].outputs[0].text
    with pytest.raises(ValueError, match="lora_int_id 1 is already used"):
        llm.generate("x", lora_request=LoRARequest("sql2", 1, str(files["other"])))
    with pytest.raises(ValueError, match="already loaded from"):
        llm.generate("x", lora_request=LoRARequest("sql", 9, str(files["other"])))
    with pytest.raises(ValueError, match="not both"):
        llm.generate("x", adapters="sql", lora_request=sql)
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("x", 0, "/p")
    with pytest.raises(Exception, match="does not exist"):
        llm.generate("x", lora_request=LoRARequest("ghost", 5, str(files["root"] / "ghost")))


def test_lora_request_in_async_generate(engine, files, reference):
    async def run() -> list[str]:
        req = LoRARequest("other", 3, str(files["other"]))
        params = SamplingParams(**GREEDY)

        async def one() -> str:
            async for out in engine.generate("Hello there", params, lora_request=req):
                last = out
            return last.outputs[0].text

        return await asyncio.gather(one(), one(), one())  # concurrent first uses load it once

    assert asyncio.run(run()) == [reference["other"]] * 3


def test_max_lora_rank_refuses_bigger_adapters_by_name(files):
    llm = LLM(str(files["model"]), dtype="float32", max_lora_rank=8, num_kv_blocks=16)
    with pytest.raises(ValueError, match=r"adapter 'big' .*rank 16 is above the configured maximum 8"):
        llm.generate("x", lora_request=LoRARequest("big", 4, str(files["rank16"])))
    assert "big" not in llm.list_adapters()


def test_max_cpu_loras_bounds_the_host_cache(files):
    def cached_after(max_cpu_loras: int | None) -> tuple[int, int]:
        llm = LLM(
            str(files["model"]), dtype="float32", max_loras=1, max_cpu_loras=max_cpu_loras, num_kv_blocks=16
        )
        most = 0
        for name in ("sql", "chat", "other"):
            llm.load_adapter(name, files[name])
            most = max(most, len(llm.engine.store.stats().cached))
        for name in ("sql", "chat", "other", "sql"):
            out = llm.generate("Hello", SamplingParams(max_tokens=2, temperature=0), adapters=name)
            assert out[0].outputs[0].finish_reason == "length"
            most = max(most, len(llm.engine.store.stats().cached))
        return most, llm.engine.store.stats().cache_evictions

    assert cached_after(None) == (3, 0)  # the byte budget alone keeps all three
    most, evictions = cached_after(1)
    assert most == 1 and evictions >= 3


def test_continuous_usage_stats_in_every_chunk(client):
    body = {"model": BASE, "prompt": "Hello there", "stream": True, **GREEDY}
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    with client.stream("POST", "/v1/completions", json=body) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    usages = [e["usage"] for e in events]
    assert all(u is not None for u in usages) and len(usages) >= 2
    prompt = len(client.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"])
    assert {u["prompt_tokens"] for u in usages} == {prompt}
    done = [u["completion_tokens"] for u in usages]
    assert done == sorted(done) and done[-1] == GREEDY["max_tokens"] and done[0] < done[-1]
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
