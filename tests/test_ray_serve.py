"""Ray Serve scale-out (``blora.ray``): a local Ray cluster, 2 engine replicas of a tiny Llama behind one
ingress, compared with the single-process server (``create_app`` over an in-process ``AsyncLLM``) on the
same model files.

One cluster serves the whole module (starting it costs ~20 s). Its HTTP answers must equal the reference
server's (ids and timestamps aside), streaming included; adapters loaded at run time serve from every
replica and are gone from all of them once unloaded; on a power-law trace, adapter affinity keeps >= 90%
of requests on a replica that already holds their adapter (Ray's routing without the multiplexed id is
measured alongside); a replica killed mid-run loses no request the client retries, and is replaced.
The measured figures are printed (``pytest tests/test_ray_serve.py -s``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray
import torch
from ray import serve
from starlette.testclient import TestClient
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.routing_bench import power_law_trace, run_trace
from blora.engine import LLM, AsyncLLM, SamplingParams
from blora.engine.wire import Packer, Unpacker
from blora.ray import ClusterConfig, build_app
from blora.ray.app import builder_argv
from blora.server.app import ServerConfig, create_app
from blora.server.options import add_serve_arguments, check_args
from tests import helpers
from tests.helpers import free_port

NAME = "tiny-llama"
KEY = "ray-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["Hello there", "The capital of France is", "def fib(n):", "Once upon a time,"]
TRACE_ADAPTERS = 8  # power-law trace over these, with 5 resident per replica: 10 slots in the cluster
RESIDENT_PER_REPLICA = 5
REPO = Path(__file__).resolve().parents[1]


# --- files, reference server, cluster ---------------------------------------------------------------


def tiny_llama() -> LlamaForCausalLM:
    """Wide logit gaps (initializer_range 0.1): greedy results must not flip with batch composition."""
    tok = helpers.tokenizer()
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, initializer_range=0.1,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ray")
    model = tiny_llama()
    model.save_pretrained(d / "model")
    helpers.tokenizer().save_pretrained(d / "model")
    paths = {"model": d / "model", "root": d / "root"}
    attn, mlp = ["q_proj", "v_proj"], ["o_proj", "down_proj"]
    for i, name in enumerate(["a", "b"] + [f"t{k}" for k in range(TRACE_ADAPTERS)]):
        paths[name] = helpers.make_adapter(model, d / name, seed=10 + i, r=4 + i % 3, target_modules=attn)
    paths["c"] = helpers.make_adapter(model, d / "root" / "c", seed=3, r=6, target_modules=mlp)
    paths["d"] = helpers.make_adapter(model, d / "root" / "d", seed=4, r=8, target_modules=attn + mlp)
    (d / "root" / "corrupt").mkdir()
    (d / "root" / "corrupt" / "adapter_config.json").write_text("{not json")
    return paths


def startup_adapters(work: dict[str, Path]) -> dict[str, str]:
    names = ["a", "b"] + [f"t{k}" for k in range(TRACE_ADAPTERS)]
    return {n: str(work[n]) for n in names}


def server_config(work: dict[str, Path], max_num_seqs: int) -> ServerConfig:
    return ServerConfig(
        served_model_name=NAME, model_source=str(work["model"]), api_key=KEY, max_num_seqs=max_num_seqs,
        max_queue=64, max_loras=4, adapter_root=work["root"], allow_runtime_adapters=True,
    )  # fmt: skip


ENGINE = dict(dtype="float32", device="cpu", max_loras=4, max_num_seqs=16, max_model_len=256)


@pytest.fixture(scope="module")
def reference(work, one_thread):
    """The single-process server on the same files, as ``blora serve`` builds it."""
    engine = AsyncLLM(model=str(work["model"]), adapters=startup_adapters(work), **ENGINE)
    with TestClient(create_app(engine, server_config(work, 16))) as client:
        yield client


@dataclass
class Cluster:
    url: str
    app: str = "blora"

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, self.url + path, headers=AUTH, timeout=120, **kwargs)

    def reports(self) -> dict[str, dict]:
        """The latest stats of each live replica, as the registry holds them (the ingress reads the same)."""
        registry = serve.get_deployment_handle("AdapterRegistry", app_name=self.app)
        state = registry.state.remote().result()
        return {name: stats for name, (t, stats) in state.reports.items() if time.time() - t < 2.0}


def deploy(work: dict[str, Path], name: str, prefix: str, affinity: bool) -> None:
    app = build_app(
        dict(ENGINE, model=str(work["model"])),
        server_config(work, 2 * ENGINE["max_num_seqs"]),
        ClusterConfig(
            replicas=2,
            max_adapters_per_replica=RESIDENT_PER_REPLICA,
            affinity=affinity,
            replica_cpus=0.5,
            threads=1,
            report_interval_s=0.2,
        ),
        startup_adapters(work),
    )
    serve.run(app, name=name, route_prefix=prefix)


@pytest.fixture(scope="module")
def cluster(work):
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(work, "blora", "/", affinity=True)
        yield Cluster(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


# --- helpers ----------------------------------------------------------------------------------------


def strip(obj):
    """A response without what differs between any two servers: ids and timestamps."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in ("id", "created")}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def same(a, b) -> bool:
    """Equal, except floats (logprobs) within 1e-4: batches differ between the servers, and so does the
    order of float additions; every token and text must still be identical."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4 * max(1.0, abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def sse(text: str) -> list:
    events = [line[len("data: ") :] for line in text.splitlines() if line]
    assert events[-1] == "[DONE]", text
    return [json.loads(e) for e in events[:-1]]


def answer(resp) -> tuple[int, object]:
    """(status, stripped body) of a JSON or SSE response."""
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        return resp.status_code, strip(sse(resp.text))
    try:
        return resp.status_code, strip(resp.json())
    except ValueError:
        return resp.status_code, resp.text


def both(cluster: Cluster, reference: TestClient, method: str, path: str, body: dict | None = None):
    kwargs = {} if body is None else {"json": body}
    ours = cluster.request(method, path, **kwargs)
    theirs = reference.request(method, path, headers=AUTH, **kwargs)
    return answer(ours), answer(theirs)


# --- no cluster needed ------------------------------------------------------------------------------


def test_wire_packing_rebuilds_every_output_exactly(one_thread, work):
    llm = LLM(model=str(work["model"]), adapters={"a": str(work["a"])}, dtype="float32", device="cpu")
    text = llm.generate(["Hello"], SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].text
    params = SamplingParams(
        max_tokens=12, temperature=0.8, seed=3, n=2, logprobs=2, prompt_logprobs=1, stop=[text[3:6]]
    )
    outs = list(llm.stream(["Hello", "Once upon"], params, adapters=["a", None]))
    assert len(outs) > 4 and all(out.prompt_logprobs for out in outs)
    packers, unpackers, later = {}, {}, []
    for out in outs:
        seen = out.request_id in packers
        packed = packers.setdefault(out.request_id, Packer()).pack(out)
        _, _, choices, head, prompt_logprobs, _ = packed
        assert [c[2] for c in choices] == [c.delta_token_ids for c in out.outputs]  # increments only
        if seen:
            later.append(len(head or ()) + len(prompt_logprobs or []))
        assert unpackers.setdefault(out.request_id, Unpacker()).unpack(packed) == out
    assert len(later) > 4 and max(later) == 0, "after a request's first output only increments travel"


def test_cli_options():
    parser = add_serve_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--replicas", "3"])
    with pytest.raises(SystemExit, match="--replicas only apply with --ray"):
        check_args(args)
    with pytest.raises(SystemExit, match="--replicas must be >= 1"):
        check_args(parser.parse_args(["--ray", "--replicas", "0"]))
    argv = builder_argv(
        parser, {"replicas": "2", "allow_runtime_adapters": "true", "lora-modules": "a=/x b=/y"}
    )
    assert argv == ["--replicas", "2", "--allow-runtime-adapters", "--lora-modules", "a=/x", "b=/y"]
    assert parser.parse_args(argv).lora_modules == [("a", "/x"), ("b", "/y")]
    with pytest.raises(ValueError, match="unknown option 'replica'"):
        builder_argv(parser, {"replica": "2"})
    with pytest.raises(ValueError, match="is a flag"):
        builder_argv(parser, {"ray": "maybe"})


# --- the cluster against the single-process server --------------------------------------------------


def test_models_and_errors_equal_single_process(cluster, reference):
    for path in ("/v1/models", f"/v1/models/{NAME}", "/v1/models/t3", "/v1/models/nope"):
        ours, theirs = both(cluster, reference, "GET", path)
        assert ours == theirs, path
    bad = [
        {"model": "nope", "prompt": "Hi"},
        {"model": NAME, "prompt": "Hi", "temperature": -1},
        {"model": NAME, "prompt": "Hi", "max_tokens": 1000},
        {"model": NAME, "prompt": [10**7]},
        {"model": "a", "prompt": "Hi", "adapter_mixture": {"a": 1.0}},
        {"model": NAME, "prompt": "Hi", "adapter_mixture": {"a": 1.0, "zzz": 1.0}},
        {"model": NAME},
    ]
    for body in bad:
        ours, theirs = both(cluster, reference, "POST", "/v1/completions", body)
        assert ours == theirs and ours[0] >= 400, body
    assert httpx.get(cluster.url + "/v1/models").status_code == 401
    assert httpx.get(cluster.url + "/health").status_code == 200


def test_greedy_outputs_equal_single_process(cluster, reference):
    """Completions and chat, streamed and not, base / adapters / a mixture, sent concurrently."""
    cases = []
    for i, model in enumerate([NAME, "a", "b", "t0", "t5"]):
        for stream in (False, True):
            prompt = PROMPTS[i % len(PROMPTS)]
            cases.append(("/v1/completions", {"model": model, "prompt": prompt, "stream": stream}))
            chat = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}
            cases.append(("/v1/chat/completions", chat))
    mixture = {"model": NAME, "prompt": PROMPTS[1], "adapter_mixture": {"a": 0.7, "b": 0.3}}
    cases += [("/v1/completions", mixture), ("/v1/completions", {**mixture, "stream": True})]
    cases.append(("/v1/completions", {"model": "b", "prompt": PROMPTS[2], "logprobs": 2}))
    cases.append(("/v1/completions", {"model": "t1", "prompt": PROMPTS[3], "echo": True, "stop": ["e"]}))
    cases.append(("/v1/completions", {"model": "a", "prompt": PROMPTS[0], "stream": True,
                                      "stream_options": {"include_usage": True}, "n": 2, "seed": 5,
                                      "temperature": 0.9}))  # fmt: skip
    for _, body in cases:
        body.setdefault("max_tokens", 10)
        body.setdefault("temperature", 0)

    def run(case):
        path, body = case
        return both(cluster, reference, "POST", path, body)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, cases))
    texts = set()
    for (path, body), (ours, theirs) in zip(cases, results, strict=True):
        assert ours[0] == 200, (body, ours)
        assert same(ours, theirs), (path, body, ours, theirs)
        if not body.get("stream") and path == "/v1/completions":
            texts.add(ours[1]["choices"][0]["text"])
    assert len(texts) >= 5, "the base model and the adapters must answer differently"


def test_runtime_adapters_load_and_unload_for_all_replicas(cluster, reference):
    load = {"lora_name": "c", "lora_path": "c"}
    for path, body in [
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "corrupt"}),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../a"}),
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "c"}),
        ("/v1/unload_lora_adapter", {"lora_name": "c"}),
        ("/v1/load_lora_adapter", load),
        ("/v1/models/c", None),
    ]:
        ours, theirs = both(cluster, reference, "POST" if body else "GET", path, body)
        assert ours == theirs, (path, body)
    prompt = {"model": "c", "prompt": PROMPTS[3], "max_tokens": 10, "temperature": 0}
    ours, theirs = both(cluster, reference, "POST", "/v1/completions", prompt)
    assert ours == theirs and ours[0] == 200
    # Every replica can serve it: past the ingress (no multiplexed id, so Ray spreads the calls), each
    # replica loads it on first use and answers as the ingress did.
    texts = set()
    for _ in range(3):
        texts |= replica_texts(cluster, "c", PROMPTS[3], n=8)
        if all("c" in r["resident_adapters"] for r in cluster.reports().values()):
            break
    assert all("c" in r["resident_adapters"] for r in cluster.reports().values())
    assert texts == {ours[1]["choices"][0]["text"]}
    # A long request holds the adapter: unloading it is refused, as in one process.
    with httpx.stream("POST", cluster.url + "/v1/completions", headers=AUTH, timeout=120,
                      json={**prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}) as resp:  # fmt: skip
        lines = resp.iter_lines()  # kept: a dropped line iterator closes the response
        assert next(lines).startswith("data: ")
        busy = cluster.request("POST", "/v1/unload_lora_adapter", json={"lora_name": "c"})
        assert busy.status_code == 400 and "is used by 1 unfinished request" in busy.text, busy.text
    for path, body in [("/v1/unload_lora_adapter", {"lora_name": "c"}), ("/v1/completions", prompt)]:
        ours, theirs = both(cluster, reference, "POST", path, body)
        assert ours == theirs, (path, body)
    # "c" is a folder of the adapter root, so that request loaded it again (the resolver): unload it again
    ours, theirs = both(cluster, reference, "POST", "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert ours == theirs and ours[0] == 200, (ours, theirs)
    wait_for(
        lambda: all("c" not in r["resident_adapters"] for r in cluster.reports().values()),
        "c unloaded everywhere",
    )
    # The same name from another directory: no replica may answer with the old weights.
    ours, theirs = both(
        cluster, reference, "POST", "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "d"}
    )
    assert ours == theirs and ours[0] == 200
    ours, theirs = both(cluster, reference, "POST", "/v1/completions", prompt)
    assert ours == theirs and ours[0] == 200


def replica_texts(cluster: Cluster, adapter: str, prompt: str, n: int) -> set[str]:
    """Greedy answers of ``n`` calls straight to the engine replicas, routed by Ray without an adapter id."""
    replicas = serve.get_deployment_handle("EngineReplica", app_name=cluster.app).options(stream=True)
    registry = serve.get_deployment_handle("AdapterRegistry", app_name=cluster.app)
    version, _ = registry.snapshot.remote().result()
    ids = helpers.tokenizer().encode(prompt)
    texts = set()
    for i in range(n):
        unpacker, out = Unpacker(), None
        params = SamplingParams(max_tokens=10, temperature=0)
        for packed in replicas.generate.remote(ids, params, adapter, f"direct-{time.time()}-{i}", version):
            out = unpacker.unpack(packed)
        texts.add(out.outputs[0].text)
    return texts


def test_metrics_have_the_single_process_names_and_cluster_totals(cluster, reference):
    def names(text: str) -> set[str]:
        return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}

    for model in (NAME, "a"):
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}
        assert cluster.request("POST", "/v1/completions", json=body).status_code == 200
    ours = cluster.request("GET", "/metrics").text
    theirs = reference.get("/metrics").text
    assert names(theirs) <= names(ours)
    cluster_names = {
        "blora:replica_adapter_loads_total",
        "blora:replica_adapter_requests_total",
        "blora:replica_adapter_evictions_total",
        "blora:replica_resident_adapters",
        "blora:cluster_replicas",
    }
    assert cluster_names <= names(ours)
    assert f'blora:cluster_replicas{{model_name="{NAME}"}} 2.0' in ours
    metric = f'blora:generation_tokens_total{{model_name="{NAME}"}}'

    def summed() -> bool:
        """The ingress's total equals the sum of the replicas' reports (both refresh in the background)."""
        generated = sum(r["generation_tokens_total"] for r in cluster.reports().values())
        lines = [
            line for line in cluster.request("GET", "/metrics").text.splitlines() if line.startswith(metric)
        ]
        return generated >= 6 and float(lines[0].split()[-1]) == generated

    wait_for(summed, "the ingress to sum the replicas' generated tokens")


# --- routing ----------------------------------------------------------------------------------------


def wait_for(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_adapter_affinity_keeps_requests_where_their_adapter_is(cluster, work):
    """The same power-law trace with multiplexed routing and with Ray's default routing (another app)."""
    trace = power_law_trace([f"t{k}" for k in range(TRACE_ADAPTERS)], 260)
    with_affinity = run_trace(cluster.url, cluster.app, trace, warmup=60, headers=AUTH)
    deploy(work, "baseline", "/baseline", affinity=False)
    try:
        baseline = run_trace(cluster.url + "/baseline", "baseline", trace, warmup=60, headers=AUTH)
    finally:
        serve.delete("baseline")
    print(
        f"\npower-law trace over {TRACE_ADAPTERS} adapters, 2 replicas x {RESIDENT_PER_REPLICA} resident, "
        f"200 requests after 60 of warm-up:\n"
        f"  multiplexed routing: hit rate {with_affinity['hit_rate']:.1%}, loads per replica {with_affinity['loads']}\n"
        f"  Ray default routing: hit rate {baseline['hit_rate']:.1%}, loads per replica {baseline['loads']}"
    )
    assert with_affinity["requests"] == baseline["requests"] == 200
    assert with_affinity["hit_rate"] >= 0.9
    assert baseline["hit_rate"] < with_affinity["hit_rate"]
    assert sum(baseline["loads"]) > sum(with_affinity["loads"])


# --- failure ----------------------------------------------------------------------------------------


def send_with_retries(cluster: Cluster, body: dict, attempts: int = 8) -> tuple[str, int]:
    """(completion text, retries): what a client that retries 5xx and broken streams gets."""
    for attempt in range(attempts):
        try:
            resp = cluster.request("POST", "/v1/completions", json=body)
            if resp.status_code >= 500:
                raise RuntimeError(resp.text)
            assert resp.status_code == 200, resp.text
            if not body.get("stream"):
                return resp.json()["choices"][0]["text"], attempt
            events = sse(resp.text)
            if any("error" in e for e in events):
                raise RuntimeError(events[-1])
            return "".join(e["choices"][0]["text"] for e in events if e["choices"]), attempt
        except (RuntimeError, httpx.HTTPError):
            time.sleep(0.5)
    pytest.fail(f"request failed {attempts} times: {body}")


def test_killed_replica_loses_no_retried_request_and_is_replaced(cluster, reference):
    models = [NAME, "a", "b", "t0", "t1", "t2"]
    bodies = [
        {"model": models[i % len(models)], "prompt": PROMPTS[i % 4] + f" {i}", "max_tokens": 96,
         "temperature": 0, "ignore_eos": True, "stream": i % 2 == 0}
        for i in range(36)
    ]  # fmt: skip
    expected = []
    for body in bodies:
        resp = reference.post("/v1/completions", json={**body, "stream": False}, headers=AUTH)
        expected.append(resp.json()["choices"][0]["text"])
    before = {r["replica"]: r["pid"] for r in cluster.reports().values()}
    assert len(before) == 2
    victim = next(iter(before))
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(send_with_retries, cluster, body) for body in bodies]
        wait_for(lambda: cluster.reports()[victim]["num_running"] > 0, "requests running on the victim")
        os.kill(before[victim], signal.SIGKILL)
        results = [f.result() for f in futures]
    assert [text for text, _ in results] == expected
    retried = sum(1 for _, n in results if n)
    assert retried >= 1, "the kill must hit requests in flight"
    print(f"\nkilled replica pid {before[victim]}: 36 requests, {retried} retried by the client, none lost")

    def healed() -> bool:
        status = serve.status().applications[cluster.app].deployments["EngineReplica"]
        fresh = [r for r in cluster.reports().values() if r["pid"] not in before.values()]
        return status.replica_states.get("RUNNING", 0) == 2 and len(fresh) == 1

    wait_for(healed, "a replacement replica", timeout=90)
    fresh = next(name for name in cluster.reports() if name not in before)
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda body: send_with_retries(cluster, body, attempts=1)[0], bodies[:12]))
    assert again == expected[:12]
    wait_for(lambda: cluster.reports()[fresh]["generation_tokens_total"] > 0, "the new replica to serve")


# --- the command line -------------------------------------------------------------------------------


def test_blora_serve_ray_joins_a_cluster_serves_and_drains(cluster, reference, work):
    """``blora serve --ray --ray-address``: deploys into an existing cluster and answers as one process
    would; on SIGTERM new requests get 503 while running ones may finish, those left at the drain timeout
    end with finish_reason "abort" (as in one process), and the command exits 0."""
    serve.delete(cluster.app)  # the module's application holds "/" and one of the CPUs
    address = ray.get_runtime_context().gcs_address
    cmd = [
        sys.executable, "-m", "blora.cli", "serve", "--ray", "--ray-address", address, "--replicas", "1",
        "--replica-cpus", "0.5", "--model", str(work["model"]), "--served-model-name", NAME, "--dtype",
        "float32", "--device", "cpu", "--max-model-len", "512", "--max-loras", "4", "--api-key", KEY,
        "--lora-modules", f"a={work['a']}", "--max-num-seqs", "1", "--drain-timeout", "1",
        "--log-level", "warning",
    ]  # fmt: skip
    log = work["model"].parent / "blora-serve-ray.log"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: proc.poll() is not None or ready(cluster), "blora serve --ray to deploy", timeout=120
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        body = {"model": "a", "prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0}
        ours, theirs = both(cluster, reference, "POST", "/v1/completions", body)
        assert ours == theirs and ours[0] == 200
        # One sequence at a time: the second long request waits behind the first, past the drain timeout.
        long = {**body, "max_tokens": 480, "ignore_eos": True, "stream": True}
        post = dict(json=long, headers=AUTH, timeout=120)
        with (
            httpx.stream("POST", cluster.url + "/v1/completions", **post) as first,
            httpx.stream("POST", cluster.url + "/v1/completions", **post) as second,
        ):
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: cluster.request("GET", "/health").status_code == 503, "draining")
            refused = cluster.request("POST", "/v1/completions", json=body)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            ends = [finish_reason(list(lines)), finish_reason(list(second.iter_lines()))]
        assert ends[0] in ("length", "abort") and ends[1] == "abort", ends
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish_reason(lines: list[str]) -> str:
    """The finish reason of a single-choice SSE stream (its last chunk before ``[DONE]``)."""
    events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]", events[-3:]
    return json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"]


def ready(cluster: Cluster) -> bool:
    try:
        return cluster.request("GET", "/v1/models").status_code == 200
    except httpx.HTTPError:
        return False
