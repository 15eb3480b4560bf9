"""End to end: a real ``python -m blora.server`` process on 127.0.0.1, driven by the official ``openai`` client.

A tiny random Llama (SmolLM2 tokenizer) and PEFT adapters with non-zero B are written to a temp dir; the
reference for every greedy result is ``blora.LLM`` in this process on the same files.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from blora.engine import LLM, SamplingParams  # noqa: E402
from blora.models import default_model_dir  # noqa: E402
from tests.helpers import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-llama"
KEY = "test-key"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Hello there", "The capital of France is", "def fib(n):", "Once upon a time, in a land far away,"]


# --- fixtures: model, adapters, server processes ----------------------------------------------------


def tiny_config(tok, hidden: int = 64) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=4096,
        initializer_range=0.1,  # wider logit gaps: greedy ties would make equality tests flaky
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )


def save_adapter(cfg: LlamaConfig, state: dict, out: Path, seed: int, rank: int, targets: list[str]) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(state)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serve")
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    cfg = tiny_config(tok)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    state = base.state_dict()
    root = d / "root"
    paths = {
        "model": d / "model",
        "root": root,
        "a": save_adapter(cfg, state, d / "a", 1, 4, ["q_proj", "v_proj"]),
        "b": save_adapter(cfg, state, d / "b", 2, 8, ALL_LINEAR),
        "c": save_adapter(cfg, state, root / "c", 3, 6, ["o_proj", "down_proj"]),
    }
    # Things that must not load: another model's adapter (shape mismatch), corrupt files, escapes.
    other = tiny_config(tok, hidden=32)
    torch.manual_seed(9)
    save_adapter(other, LlamaForCausalLM(other).state_dict(), root / "wrong_shape", 4, 4, ["q_proj"])
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text("{not json")
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"garbage")
    (root / "escape").symlink_to(paths["a"])
    return paths


@pytest.fixture(scope="module")
def reference(work):
    adapters = {k: str(work[k]) for k in ("a", "b", "c")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the servers (see launch); restored after this module
    try:
        yield LLM(model=str(work["model"]), adapters=adapters, dtype="float32", device="cpu")
    finally:
        torch.set_num_threads(threads)


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def http(self, method: str, path: str, timeout: float = 120, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=timeout, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels``."""
        total = 0.0
        for key, value in self.metrics().items():
            m = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", key)
            if (
                m
                and m.group(1) == name
                and all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items())
            ):
                total += value
        return total

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch(work: dict[str, Path], *extra: str) -> Server:
    port = free_port()
    log = work["model"].parent / f"server-{port}.log"
    cmd = [
        sys.executable, "-m", "blora.server", "--model", str(work["model"]), "--served-model-name", NAME,
        "--port", str(port), "--dtype", "float32", "--device", "cpu", "--log-level", "info", *extra,
    ]  # fmt: skip
    # One intra-op thread: the tiny model gains nothing from more, and on a shared 2-core machine
    # spinning OpenMP workers slow every engine step down many times over.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = Server(proc, port, log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    pytest.fail(f"server did not become healthy:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def server(work):
    s = launch(
        work,
        "--lora-modules", f"a={work['a']}", f"b={work['b']}",
        "--adapter-root", str(work["root"]), "--allow-runtime-adapters", "--api-key", KEY,
        "--engine-process", "on",  # the engine in its own process (the small server keeps one process)
    )  # fmt: skip
    yield s
    s.stop()


def greedy(reference: LLM, prompts: list[str], adapters: list[str | None], max_tokens: int = 12):
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return [o.outputs[0] for o in reference.generate(prompts, params, adapters=adapters)]


def adapter_of(model: str) -> str | None:
    return None if model == NAME else model


def assert_error_body(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# --- behaviour ------------------------------------------------------------------------------------


def test_models_lists_base_and_adapters(server, work):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {NAME, "a", "b"}
    assert models["a"].model_extra["parent"] == NAME and models["a"].model_extra["root"] == str(work["a"])
    assert models[NAME].model_extra["parent"] is None


def test_greedy_completions_equal_llm_generate(server, reference):
    client = server.client()
    cases = [(p, m) for p in PROMPTS[:3] for m in (NAME, "a", "b")]
    expected = greedy(reference, [p for p, _ in cases], [adapter_of(m) for _, m in cases])

    def run(case):
        prompt, model = case
        kw = dict(model=model, prompt=prompt, max_tokens=12, temperature=0)
        return client.completions.create(**kw), list(client.completions.create(**kw, stream=True))

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run, cases))
    for case, exp, (r, chunks) in zip(cases, expected, results, strict=True):
        assert r.choices[0].text == exp.text, case
        assert r.choices[0].finish_reason == exp.finish_reason
        assert r.usage.completion_tokens == len(exp.token_ids)
        assert len({c.id for c in chunks}) == 1 and chunks[0].id != r.id
        assert "".join(c.choices[0].text for c in chunks) == exp.text
        assert chunks[-1].choices[0].finish_reason == exp.finish_reason
    texts = {e.text for e in expected[:3]}
    assert len(texts) == 3, "base and adapters must differ (non-zero B)"


def test_chat_applies_template_and_equals_llm_chat(server, reference):
    messages = [{"role": "user", "content": "Write a haiku about batching."}]
    client = server.client()
    for model in (NAME, "b"):
        exp = reference.chat(
            messages, SamplingParams(max_tokens=10, temperature=0), adapters=adapter_of(model)
        )
        exp = exp[0].outputs[0]
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
        assert r.choices[0].message.content == exp.text and r.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == exp.text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(exp.token_ids)
        assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_adapter_mixture_extension_equals_llm_generate(server, reference):
    mix = {"a": 0.7, "b": 0.3}
    params = SamplingParams(max_tokens=10, temperature=0)
    (exp,) = reference.generate([PROMPTS[1]], params, adapters=[mix])
    client = server.client()
    kw = dict(
        model=NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0, extra_body={"adapter_mixture": mix}
    )
    assert client.completions.create(**kw).choices[0].text == exp.outputs[0].text
    assert (
        "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
        == exp.outputs[0].text
    )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(**(kw | {"extra_body": {"adapter_mixture": {"a": 1, "zzz": 1}}}))


def test_32_concurrent_requests_over_mixed_adapters(server, reference):
    models = [NAME, "a", "b"]
    cases = [(PROMPTS[i % 4] + f" #{i}", models[i % 3], i % 2 == 0) for i in range(32)]
    expected = greedy(reference, [p for p, _, _ in cases], [adapter_of(m) for _, m, _ in cases], max_tokens=8)
    client = server.client()

    def run(case):
        prompt, model, stream = case
        if stream:
            chunks = client.completions.create(
                model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True
            )
            return "".join(c.choices[0].text for c in chunks)
        return (
            client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
        )

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(run, cases))
    assert texts == [e.text for e in expected]


def test_sampling_fields_over_http(server):
    client = server.client()
    kw = dict(model="a", prompt="Tell me a story", max_tokens=8, temperature=1.0, seed=7, n=2)
    first = client.completions.create(**kw, extra_body={"ignore_eos": True})
    second = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text  # n choices sample independently
    assert [c.index for c in first.choices] == [0, 1] and first.usage.completion_tokens == 16
    greedy_text = (
        client.completions.create(model="a", prompt="Hi", max_tokens=12, temperature=0).choices[0].text
    )
    words = greedy_text.split()
    stop = words[1] if len(words) > 1 else greedy_text[1:]
    assert stop, greedy_text
    stopped = client.completions.create(model="a", prompt="Hi", max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    assert greedy_text.startswith(stopped.choices[0].text)
    lp = (
        client.completions.create(model="b", prompt="Hi", max_tokens=4, temperature=0, logprobs=3)
        .choices[0]
        .logprobs
    )
    assert len(lp.tokens) == 4 and all(len(t) == 3 for t in lp.top_logprobs)
    assert all(tl >= max(t.values()) - 1e-4 for tl, t in zip(lp.token_logprobs, lp.top_logprobs, strict=True))
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True, top_logprobs=2,
        presence_penalty=1.5, frequency_penalty=1.0, temperature=0,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)


def test_error_statuses_and_bodies(server, work):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="hello " * 50, max_tokens=4090)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model=NAME, prompt="x")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    bad_json = server.http(
        "POST", "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert_error_body(bad_json, 400)
    assert_error_body(
        server.http("POST", "/v1/chat/completions", json={"model": NAME, "messages": "hi"}), 400
    )
    assert_error_body(server.http("POST", "/v1/completions", json={"model": NAME}), 400)
    missing = server.http(
        "POST", "/v1/load_lora_adapter", json={"lora_name": "m", "lora_path": "does/not/exist"}
    )
    assert_error_body(missing, 404)
    assert_error_body(server.http("POST", "/v1/unload_lora_adapter", json={"lora_name": "nope"}), 404)
    assert_error_body(
        httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "c"}), 401
    )


def test_runtime_adapter_load_use_unload(server, reference, work):
    r = server.http("POST", "/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"})
    assert r.status_code == 200, r.text
    client = server.client()
    assert any(m.id == "c" and m.model_extra["parent"] == NAME for m in client.models.list().data)
    (exp,) = greedy(reference, [PROMPTS[0]], ["c"])
    assert (
        client.completions.create(model="c", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
        == exp.text
    )
    assert server.http("POST", "/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200
    assert "c" not in [m.id for m in client.models.list().data]
    # "c" is a folder of the adapter root: a request for it loads it again (vLLM's resolver behaviour)
    again = client.completions.create(model="c", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert again.choices[0].text == exp.text
    assert server.http("POST", "/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200
    with pytest.raises(openai.NotFoundError):  # not under the root: an unknown model
        client.completions.create(model="not-in-the-root", prompt="x")


def test_50_bad_adapter_loads_while_good_requests_run(server, reference, work):
    bad_paths = ["wrong_shape", "corrupt", "escape", "../a", str(work["a"]), "/etc", "missing", "c/../../a"]
    bad = [(f"bad{i}", bad_paths[i % len(bad_paths)]) for i in range(50)]
    cases = [(PROMPTS[i % 4], ["a", "b", NAME][i % 3]) for i in range(6)]
    expected = greedy(reference, [p for p, _ in cases], [adapter_of(m) for _, m in cases], max_tokens=8)
    client = server.client()

    def good(case):
        prompt, model = case
        return (
            client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
        )

    def load(item):
        name, path = item
        return server.http("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

    with ThreadPoolExecutor(16) as pool:
        good_futures = [pool.submit(good, c) for c in cases]
        bad_results = list(pool.map(load, bad))
        texts = [f.result() for f in good_futures]
    assert texts == [e.text for e in expected]
    for (_, path), r in zip(bad, bad_results, strict=True):
        assert r.status_code in (400, 404), (path, r.status_code, r.text)
        assert r.json()["error"]["message"]
    assert {m.id for m in client.models.list().data} == {NAME, "a", "b"}


def test_disconnect_aborts_and_frees_kv_blocks(server):
    client = server.client()
    stream = client.completions.create(
        model="a",
        prompt="Count forever:",
        max_tokens=4000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert server.metric("blora:num_requests_running") == 1
    assert server.metric("blora:kv_cache_usage_perc") > 0
    assert server.metric("blora:adapter_requests_running", adapter="a") == 1
    assert 'running_lora_adapters="a"' in httpx.get(server.url + "/metrics").text
    start = time.monotonic()
    stream.close()
    while time.monotonic() - start < 15:
        if (
            server.metric("blora:num_requests_running") == 0
            and server.metric("blora:kv_cache_usage_perc") == 0
        ):
            break
        time.sleep(0.1)
    assert server.metric("blora:num_requests_running") == 0
    assert server.metric("blora:kv_cache_usage_perc") == 0
    assert server.metric("blora:server_requests_in_flight") == 0
    gen_tokens = server.metric("blora:generation_tokens_total")
    time.sleep(0.5)
    assert server.metric("blora:generation_tokens_total") == gen_tokens  # nothing generates any more


def test_disconnect_of_non_streaming_request_aborts_it(server):
    body = {"model": "b", "prompt": "Count:", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        server.http("POST", "/v1/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 15
    while server.metric("blora:server_requests_in_flight") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("blora:server_requests_in_flight") == 0
    assert server.metric("blora:num_requests_running") == 0
    assert server.metric("blora:kv_cache_usage_perc") == 0


def test_metrics_moved(server):
    m = server.metric
    assert m("blora:time_to_first_token_seconds_count") >= 40
    assert m("blora:inter_token_latency_seconds_count") > 0
    assert m("blora:e2e_request_latency_seconds_count") >= 40
    assert m("blora:request_time_per_output_token_seconds_count") > 0
    assert m("blora:prompt_tokens_total") > 100 and m("blora:generation_tokens_total") > 300
    assert m("blora:request_success_total", finished_reason="length") >= 40
    assert m("blora:adapter_loads_total", outcome="failure") >= 50
    assert m("blora:adapter_loads_total", outcome="success") >= 1


# --- backpressure and shutdown on a small server ------------------------------------------------------


@pytest.fixture(scope="module")
def small(work):
    s = launch(
        work, "--max-num-seqs", "1", "--max-queue", "1", "--drain-timeout", "2", "--stream-interval", "4",
        "--engine-process", "off",
    )  # fmt: skip
    yield s
    s.stop()


def long_stream(server: Server, max_tokens: int):
    return server.client().completions.create(
        model=NAME,
        prompt="Go:",
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )


def test_stream_interval_sends_the_first_token_then_four_at_a_time(small, reference):
    """``--stream-interval 4``: the first token alone (time to first token unchanged), then chunks of 4 new
    tokens, the rest with the end; the text is the greedy completion."""
    expected = greedy(reference, [PROMPTS[1]], [None], max_tokens=10)[0]
    stream = small.client().completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = [c for c in stream if c.choices]
    assert [c.usage.completion_tokens for c in chunks] == [1, 5, 9, 10]
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_full_queue_answers_429_with_retry_after(small):
    streams = [long_stream(small, 2000) for _ in range(2)]  # 1 running + 1 waiting = the bound
    try:
        assert small.metric("blora:server_requests_in_flight") == 2
        r = small.http("POST", "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
        err = assert_error_body(r, 429)
        assert err["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError):
            small.client().completions.create(model=NAME, prompt="x", max_tokens=2)
    finally:
        for s in streams:
            s.close()
    deadline = time.monotonic() + 15
    while small.metric("blora:server_requests_in_flight") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert small.client().completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].text is not None
    assert small.metric("blora:request_rejected_total", reason="queue_full") == 2


def test_sigterm_drains_in_flight_then_exits_cleanly(small):
    """SIGTERM: new requests get 503, the running request finishes, the one still queued when the drain
    timeout expires is aborted, and the process exits with status 0."""
    running = iter(long_stream(small, 8))
    texts = [next(running).choices[0].text]
    queued = iter(long_stream(small, 4000))  # waits behind `running` (max_num_seqs=1); can't end in 2 s
    small.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(small.url + "/health", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "server did not start draining"
        time.sleep(0.05)
    r = small.http("POST", "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
    assert assert_error_body(r, 503)["code"] == "shutting_down"
    rest = list(running)  # the in-flight request finishes normally
    texts += [c.choices[0].text for c in rest]
    assert rest[-1].choices[0].finish_reason == "length"
    assert list(queued)[-1].choices[0].finish_reason == "abort"  # outlived the 2 s drain timeout
    assert small.proc.wait(30) == 0, small.log_tail()
    log = small.log.read_text()
    assert "Traceback" not in log and "drain timeout: aborting 1 engine request" in log
