"""Structured outputs and tool calls over HTTP: a real server (uvicorn in a thread, a tiny random Llama behind
AsyncLLM, a PEFT adapter with non-zero B) driven by the official ``openai`` client and raw requests.

A tiny random model writes garbage; every JSON that parses and validates here does so because the grammar
was enforced. Cuts by ``max_tokens`` must say ``length``."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
import pydantic  # noqa: E402
import uvicorn  # noqa: E402

from blora.engine import AsyncLLM  # noqa: E402
from blora.server import ServerConfig, create_app  # noqa: E402
from blora.server.render import ToolStream  # noqa: E402
from blora.server.tools import ToolPlan, parse_hermes, plan_tools  # noqa: E402
from tests.helpers import make_adapter, tiny_model, tokenizer  # noqa: E402

BASE = "tiny"
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["utc", "cet"]}}, "required": ["tz"]},
    },
}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=99)
    role: str = pydantic.Field(json_schema_extra={"enum": ["dev", "ops"]})


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tools")
    base = tiny_model("llama")
    adapter = make_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    engine = AsyncLLM(tiny_model("llama"), tokenizer=tokenizer(), adapters={"a": str(adapter)}, block_size=4)
    app = create_app(engine, ServerConfig(served_model_name=BASE, max_num_seqs=64))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(60)
        torch.set_num_threads(before)


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=120, max_retries=0)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def error_of(resp: httpx.Response, param: str | None) -> str:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    return err["message"]


def sse(resp: httpx.Response) -> list[dict]:
    return [
        json.loads(line[6:])
        for line in resp.text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


# --- structured outputs ------------------------------------------------------------------------------


def test_openai_parse_with_a_pydantic_model(live):
    for model in (BASE, "a"):
        done = client(live).chat.completions.parse(
            model=model, messages=MSGS, response_format=Person, max_tokens=80, temperature=0
        )
        choice = done.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Person)
        jsonschema.validate(json.loads(choice.message.content), Person.model_json_schema())


def test_response_format_json_object_and_schema_streamed_and_not(live):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 9}}, "required": ["ok", "n"]}  # fmt: skip
    formats = [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}},
    ]
    for rf in formats:
        body = {"model": "a", "messages": MSGS, "response_format": rf, "max_tokens": 120, "temperature": 0}
        full = post(live, "/v1/chat/completions", body).json()["choices"][0]
        chunks = sse(post(live, "/v1/chat/completions", {**body, "stream": True}))
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert streamed == full["message"]["content"]
        if full["finish_reason"] == "stop":
            obj = json.loads(full["message"]["content"])
            assert isinstance(obj, dict)
            if rf["type"] == "json_schema":
                jsonschema.validate(obj, schema)
        else:
            assert full["finish_reason"] == "length"


@pytest.mark.parametrize(
    "field, value, check",
    [
        ("guided_json", {"type": "array", "items": {"enum": [1, 2]}, "minItems": 1, "maxItems": 3},
         lambda t: set(json.loads(t)) <= {1, 2}),
        ("guided_regex", r"[A-Z]{2}[0-9]{2}", lambda t: re.fullmatch(r"[A-Z]{2}[0-9]{2}", t)),
        ("guided_choice", ["left", "right"], lambda t: t in ("left", "right")),
        ("guided_grammar", 'root ::= "a" "b"+ "c"', lambda t: re.fullmatch(r"ab+c", t)),
        ("structured_outputs", {"regex": "[0-9]{4}"}, lambda t: re.fullmatch(r"[0-9]{4}", t)),
    ],
)  # fmt: skip
def test_vllm_guided_fields_on_completions_with_n_and_stream(live, field, value, check):
    body = {
        "model": "a",
        "prompt": "Answer:",
        field: value,
        "max_tokens": 60,
        "n": 3,
        "temperature": 1.0,
        "seed": 1,
    }
    choices = post(live, "/v1/completions", body).json()["choices"]
    assert len(choices) == 3
    for c in choices:
        assert c["finish_reason"] == "length" or check(c["text"]), c
    assert sum(c["finish_reason"] == "stop" for c in choices) >= 2
    chunks = sse(post(live, "/v1/completions", {**body, "stream": True}))
    texts = ["", "", ""]
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["text"]
    assert texts == [c["text"] for c in choices]  # seeded: the same three outputs


def test_constrained_and_plain_requests_together(live):
    """Concurrent requests: plain greedy outputs equal their solo outputs; constrained ones validate."""
    plain = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
    solo = post(live, "/v1/completions", plain).json()["choices"][0]["text"]
    schema = {"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"]}
    constrained = {"model": "a", "prompt": "J:", "guided_json": schema, "max_tokens": 60, "temperature": 0}
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(post, live, "/v1/completions", plain if i % 2 else constrained) for i in range(8)
        ]
        results = [f.result().json()["choices"][0] for f in futures]
    for i, r in enumerate(results):
        if i % 2:
            assert r["text"] == solo
        else:
            jsonschema.validate(json.loads(r["text"]), schema)


# --- tool calls --------------------------------------------------------------------------------------


def test_openai_client_tools_named_choice(live):
    done = client(live).chat.completions.create(
        model="a",
        messages=MSGS,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), PARAMS["get_weather"])


def test_openai_client_tools_required(live):
    for parallel in (False, True):
        done = client(live).chat.completions.create(
            model=BASE,
            messages=MSGS,
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=parallel,
            max_tokens=150,
            temperature=0,
        )
        choice = done.choices[0]
        if parallel and choice.finish_reason == "length":  # a random model may keep adding calls
            assert choice.message.content.startswith('[{"name": "') and not choice.message.tool_calls
            continue
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_openai_client_tools_auto_and_none(live):
    """The default choice with tools is "auto": the model may answer in text (this one does)."""
    for choice_arg in ({}, {"tool_choice": "auto"}, {"tool_choice": "none"}):
        done = client(live).chat.completions.create(
            model=BASE, messages=MSGS, tools=[WEATHER], max_tokens=8, temperature=0, **choice_arg
        )
        choice = done.choices[0]
        assert choice.finish_reason == "length" and choice.message.content and not choice.message.tool_calls


def test_tool_calls_stream_in_openai_delta_shape(live):
    c = client(live)
    kwargs = dict(model="a", messages=MSGS, tools=[WEATHER, TIME], max_tokens=80, temperature=0)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice in (named, "required"):
        full = c.chat.completions.create(tool_choice=tool_choice, **kwargs).choices[0]
        calls: dict[int, dict] = {}
        finish = None
        for chunk in c.chat.completions.create(tool_choice=tool_choice, stream=True, **kwargs):
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
                for d in ch.delta.tool_calls or []:
                    entry = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
                    entry["id"] = entry["id"] or d.id
                    entry["name"] += d.function.name or ""
                    entry["arguments"] += d.function.arguments or ""
        assert finish == full.finish_reason
        assert [(v["name"], v["arguments"]) for _, v in sorted(calls.items())] == [
            (t.function.name, t.function.arguments) for t in full.message.tool_calls
        ]
        assert all(v["id"].startswith("call_") for v in calls.values())


def test_assistant_tool_calls_and_tool_results_in_history(live):
    history = [
        *MSGS,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = post(
        live,
        "/v1/chat/completions",
        {"model": BASE, "messages": history, "tools": [WEATHER], "max_tokens": 4},
    )
    assert r.status_code == 200, r.text


# --- refusals: 400 naming the field, never a 500, nothing reaches the engine --------------------------


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"guided_json": {"type": "object", "allOf": [{}]}}, "guided_json", "allOf"),
        ({"guided_json": {"type": "strin"}}, "guided_json", "strin"),
        ({"guided_regex": "[a-"}, "guided_regex", "invalid regex"),
        ({"guided_grammar": "root ::= "}, "guided_grammar", "invalid grammar"),
        ({"guided_grammar": "x" * 70000}, "guided_grammar", "at most"),
        ({"guided_choice": []}, "guided_choice", "choice"),
        ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "structural_tag"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "integer", "multipleOf": 2}},
                }
            },
            "response_format",
            "multipleOf",
        ),  # fmt: skip
        ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
        ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend", "xgrammar"),
        ({"min_tokens": 30, "max_tokens": 5}, "min_tokens", "min_tokens"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias", "vocabulary"),
        ({"allowed_token_ids": [10**8]}, "allowed_token_ids", "vocabulary"),
        ({"use_beam_search": True}, "use_beam_search", "not supported"),
        ({"prompt_logprobs": 21}, "prompt_logprobs", "less than or equal to 20"),
        ({"truncate_prompt_tokens": 5}, "truncate_prompt_tokens", "not supported"),
        ({"frobnicate": 1}, "frobnicate", "Extra inputs"),
        ({"suffix": "x"}, "suffix", "suffix"),
    ],
)
def test_completions_refusals_name_the_field(live, body, param, words):
    message = error_of(post(live, "/v1/completions", {"model": BASE, "prompt": "x", **body}), param)
    assert words in message, message


@pytest.mark.parametrize(
    "body, param, words",
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools",
            "type 'object'",
        ),  # fmt: skip
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "name"),
        ({"tools": [{"type": "retrieval"}]}, "tools", "'function'"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "distinct"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not in tools",
        ),  # fmt: skip
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "constrains",
        ),  # fmt: skip
        ({"functions": [{"name": "f"}]}, "functions", "tools"),
        ({"n": 1, "audio": {"voice": "x"}}, "audio", "not supported"),
        ({"messages": [{"role": "user", "content": "x", "weird": 1}]}, "messages", "Extra inputs"),
    ],
)
def test_chat_refusals_name_the_field(live, body, param, words):
    message = error_of(post(live, "/v1/chat/completions", {"model": BASE, "messages": MSGS, **body}), param)
    assert words in message, message


def test_bookkeeping_fields_are_accepted(live):
    body = {
        "model": BASE, "messages": MSGS, "max_tokens": 2, "user": "u", "metadata": {"k": "v"}, "store": False,
        "service_tier": "auto", "safety_identifier": "s", "prompt_cache_key": "p", "parallel_tool_calls": True,
        "modalities": ["text"], "guided_decoding_backend": "xgrammar", "priority": 0,
    }  # fmt: skip
    assert post(live, "/v1/chat/completions", body).status_code == 200


def test_new_sampling_fields_reach_the_engine(live):
    """Each field changes the output over HTTP (so none is silently dropped on the way)."""
    base = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    plain = post(live, "/v1/completions", base).json()["choices"][0]["text"]
    the = tokenizer().encode(" the")[0]
    forced = post(live, "/v1/completions", {**base, "logit_bias": {str(the): 100}}).json()["choices"][0]
    assert forced["text"] == " the" * 6
    allowed = post(live, "/v1/completions", {**base, "allowed_token_ids": [300]}).json()["choices"][0]["text"]
    assert allowed == tokenizer().decode([300] * 6)
    word = plain.split()[0]
    banned = post(live, "/v1/completions", {**base, "bad_words": [word]}).json()["choices"][0]["text"]
    assert banned != plain
    stop = plain[3:6]
    kept = post(live, "/v1/completions", {**base, "stop": [stop], "include_stop_str_in_output": True}).json()
    assert kept["choices"][0]["text"].endswith(stop)
    special = tokenizer().convert_tokens_to_ids("<|im_start|>")
    shown = post(
        live, "/v1/completions", {**base, "allowed_token_ids": [special], "skip_special_tokens": False}
    ).json()["choices"][0]["text"]
    assert shown == "<|im_start|>" * 6


# --- the parsers, without a model ----------------------------------------------------------------------


def test_hermes_parser():
    text = 'Sure.<tool_call>\n{"name": "get_time", "arguments": {"tz": "utc"}}\n</tool_call>'
    parsed = parse_hermes(text, {"get_time"})
    assert parsed.content == "Sure." and parsed.calls == [("get_time", '{"tz": "utc"}')]
    two = (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"x": 1}}'
    )
    assert parse_hermes(two, {"a", "b"}).calls == [("a", "{}"), ("b", '{"x": 1}')]
    assert parse_hermes('<tool_call>{"name": "zzz"}</tool_call>', {"a"}).calls == []
    assert parse_hermes("<tool_call>{broken", {"a"}).content == "<tool_call>{broken"


def test_auto_stream_holds_back_tool_calls():
    plan = plan_tools([TIME], "auto", True)
    stream = ToolStream(plan)
    pieces = [
        "Let me",
        " check <tool",
        '_call>{"name": "get_time", ',
        '"arguments": {"tz": "cet"}}</tool_call>',
    ]
    sent = []
    for p in pieces:
        deltas, finish = stream.feed(p, None)
        sent += [d.content for d in deltas if d.content]
        assert finish is None
    deltas, finish = stream.feed("", "stop")
    assert "".join(sent) == "Let me check " and finish == "tool_calls"
    (call,) = deltas[0].tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"tz": "cet"}
    plain = ToolStream(plan)
    out = [d.content for p in ("a <to", "y> b") for d in plain.feed(p, None)[0]]
    out += [d.content for d in plain.feed("", "stop")[0]]
    assert "".join(out) == "a <toy> b"


def test_template_with_tools_gets_them_and_others_get_a_system_prompt():
    from blora.server.completions import with_tools

    plan = plan_tools([WEATHER], "auto", True)

    class WithTools:
        chat_template = "{% for t in tools %}{{ t }}{% endfor %}"

    msgs, kwargs = with_tools(WithTools(), plan, [{"role": "user", "content": "hi"}], {})
    assert kwargs["tools"][0]["function"]["name"] == "get_weather" and len(msgs) == 1
    msgs, kwargs = with_tools(tokenizer(), plan, [{"role": "user", "content": "hi"}], {})
    assert "tools" not in kwargs and msgs[0]["role"] == "system" and "<tool_call>" in msgs[0]["content"]
    assert isinstance(plan, ToolPlan) and plan_tools(None, None, True).mode == "none"


def test_auto_tool_calls_end_to_end_over_a_scripted_engine():
    """A scripted engine writes a Hermes tool call: the server parses it, streamed and not."""
    from fastapi.testclient import TestClient

    from tests.test_server_api import FakeEngine

    class Scripted(FakeEngine):
        max_model_len = 4096
        prompts: list[list[int]] = []

        def generate(self, prompt, sampling_params, adapter=None, request_id=None):
            self.prompts.append(list(prompt))  # the fake's own 64-token check sees the prompt's tail only
            return super().generate(prompt[-2:], sampling_params, adapter, request_id)

    tok = tokenizer()
    engine = Scripted(tok)
    engine.script = tok.encode('I will check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                               '"unit": "c", "days": 2}}\n</tool_call>END')  # fmt: skip
    body = {"model": BASE, "messages": MSGS, "tools": [WEATHER], "max_tokens": 60, "stop": ["END"]}
    with TestClient(create_app(engine, ServerConfig(served_model_name=BASE))) as http:
        done = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert "<tools>" in tok.decode(engine.prompts[-1])  # the template has no tools: a system prompt
        assert done["finish_reason"] == "tool_calls" and done["message"]["content"] == "I will check."
        (call,) = done["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "c", "days": 2}
        chunks = sse(http.post("/v1/chat/completions", json={**body, "stream": True}))
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls") or []]
    assert content == "I will check." and deltas[-1]["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c", "days": 2})
    ]
