"""vLLM's documented multi-LoRA recipe, run against ``blora serve`` as a vLLM user would run it.

The start commands and client snippets are the ones in vLLM's docs ("LoRA Adapters": offline
``LLM(..., enable_lora=True)`` + ``LoRARequest``, ``vllm serve MODEL --enable-lora --lora-modules
sql-lora=PATH``, ``curl /v1/models``, ``curl /v1/completions``, ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``, the JSON form of ``--lora-modules`` with ``base_model_name``, the local-directory
resolver; "OpenAI-Compatible Server": ``vllm serve MODEL --dtype auto --api-key token-abc123``, the
``openai`` client's chat call, content parts, ``extra_body`` (``top_k``, ``guided_choice``) and
``extra_headers`` with ``x-request-id``).
What differs: the executable (``blora`` for ``vllm``; ``from blora import ...`` for ``from vllm ...``), a free
``--port`` instead of 8000, local paths of a tiny model and PEFT adapters built here instead of hub ids, and
for runtime loading blora's ``--allow-runtime-adapters --adapter-root DIR`` instead of the
``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` / ``VLLM_LORA_RESOLVER_CACHE_DIR`` environment variables (blora confines
runtime loads to one directory). Every greedy result is checked against blora's offline ``LLM``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from tests.helpers import make_adapter, tiny_config, tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def blora_executable() -> list[str]:
    exe = shutil.which("blora") or str(Path(sys.executable).parent / "blora")
    return [exe] if Path(exe).is_file() else [sys.executable, "-m", "blora.cli"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    config = tiny_config("llama", len(tokenizer()))
    config.max_position_embeddings = 1024  # the docs' max_tokens=256 after a 64-token prompt
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(d / "Meta-Llama-3-8B-Instruct")
    tokenizer().save_pretrained(d / "Meta-Llama-3-8B-Instruct")
    # the model's recommended defaults, applied by `serve` like vLLM's --generation-config auto: requests
    # without max_tokens (the docs' chat snippets) stop after 24 tokens instead of filling the context
    (d / "Meta-Llama-3-8B-Instruct" / "generation_config.json").write_text(json.dumps({"max_new_tokens": 24}))
    out = {"model": d / "Meta-Llama-3-8B-Instruct", "root": d / "loras"}
    out["sql"] = make_adapter(model, d / "sql-lora-test", seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])  # fmt: skip
    out["foobar"] = make_adapter(model, out["root"] / "foobar", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])  # fmt: skip
    out["sql_in_root"] = make_adapter(model, out["root"] / "sql-lora-adapter", seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])  # fmt: skip
    return out


class Server:
    def __init__(self, argv: list[str], log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [*blora_executable(), *argv, "--port", str(self.port)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"blora serve exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ping", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"blora serve did not start:\n{log.read_text()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def offline(files, one_thread):
    """The docs' offline snippet, unchanged but for the import lines and the local paths."""
    from blora import (
        LLM,
        LoRARequest,  # vLLM: from vllm.lora.request import LoRARequest
        SamplingParams,
    )

    sql_lora_path = str(files["sql"])
    llm = LLM(model=str(files["model"]), enable_lora=True)
    sampling_params = SamplingParams(temperature=0, max_tokens=256, stop=["[/assistant]"])
    prompts = [
        "[user] Write a SQL query to answer the question based on the table schema.\n\n context: CREATE TABLE table_name_74 (icao VARCHAR, airport VARCHAR)\n\n question: Name the ICAO for lilongwe international airport [/user] [assistant]",  # noqa: E501
        "[user] Write a SQL query to answer the question based on the table schema.\n\n context: CREATE TABLE table_name_11 (nationality VARCHAR, elector VARCHAR)\n\n question: When Anchero Pantaleone was the elector what is under nationality? [/user] [assistant]",  # noqa: E501
    ]
    outputs = llm.generate(
        prompts, sampling_params, lora_request=LoRARequest("sql_adapter", 1, sql_lora_path)
    )
    base = llm.generate(prompts, sampling_params)
    assert all(o.adapter == "sql_adapter" and o.outputs[0].token_ids for o in outputs)
    assert [o.outputs[0].text for o in outputs] != [o.outputs[0].text for o in base]  # the adapter acts

    def greedy(prompt: str, max_tokens: int, adapter: str | None) -> str:
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        return llm.generate(prompt, params, adapters=adapter)[0].outputs[0].text

    llm.load_adapter("foobar", files["foobar"])
    return greedy


@pytest.fixture(scope="module")
def lora_server(files):
    model = str(files["model"])
    server = Server(
        ["serve", model, "--enable-lora", "--lora-modules", f"sql-lora={files['sql']}"],
        files["model"].parent / "lora.log",
    )
    yield server, model
    server.stop()


def test_serving_lora_adapters(lora_server, files, offline):
    server, model = lora_server
    # curl localhost:8000/v1/models | jq .
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [(model, "model"), ("sql-lora", "model")]
    assert models["data"][1]["parent"] == model and models["data"][1]["root"] == str(files["sql"])
    # curl http://localhost:8000/v1/completions -H "Content-Type: application/json" -d '{...}'
    r = httpx.post(
        f"{server.url}/v1/completions",
        headers={"Content-Type": "application/json"},
        content=json.dumps(
            {"model": "sql-lora", "prompt": "San Francisco is a", "max_tokens": 7, "temperature": 0}
        ),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == offline("San Francisco is a", 7, "sql_adapter")


def test_dynamically_serving_lora_adapters(files, offline):
    model = str(files["model"])
    spec = json.dumps({"name": "sql-lora", "path": str(files["sql"]), "base_model_name": model})
    server = Server(
        [
            "serve",
            model,
            "--enable-lora",
            "--lora-modules",
            spec,
            "--allow-runtime-adapters",
            "--adapter-root",
            str(files["root"]),
        ],  # fmt: skip
        files["model"].parent / "dynamic.log",
    )
    try:
        cards = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert cards[1]["id"] == "sql-lora" and cards[1]["parent"] == model  # model lineage in the card
        # curl -X POST http://localhost:8000/v1/load_lora_adapter -H ... -d '{"lora_name": ..., "lora_path": ...}'
        r = httpx.post(
            f"{server.url}/v1/load_lora_adapter",
            headers={"Content-Type": "application/json"},
            json={"lora_name": "sql_adapter", "lora_path": str(files["sql_in_root"])},
            timeout=120,
        )
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql_adapter' added successfully.")
        body = {"model": "sql_adapter", "prompt": "San Francisco is a", "max_tokens": 7, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        same_weights = offline("San Francisco is a", 7, "sql_adapter")
        assert r.json()["choices"][0]["text"] == same_weights
        r = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "sql_adapter"}, timeout=60)
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql_adapter' removed successfully.")
        # the local-directory resolver: a request for "foobar" loads <dir>/foobar
        r = httpx.post(f"{server.url}/v1/completions", json={**body, "model": "foobar"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == offline("San Francisco is a", 7, "foobar")
    finally:
        server.stop()


def test_openai_compatible_server_snippets(files, offline):
    model = str(files["model"])
    server = Server(
        ["serve", model, "--dtype", "auto", "--api-key", "token-abc123"], files["model"].parent / "openai.log"
    )
    try:
        from openai import OpenAI

        client = OpenAI(base_url=f"{server.url}/v1", api_key="token-abc123")
        completion = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello!"}]
        )
        print(completion.choices[0].message)
        assert completion.choices[0].message.role == "assistant" and completion.choices[0].message.content
        assert completion.usage.completion_tokens <= 24  # the generation config's max_new_tokens
        parts = client.chat.completions.create(
            model=model,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Classify this sentiment: vLLM is wonderful!"}],
                }
            ],  # fmt: skip
            temperature=0,
            max_tokens=8,
        )
        plain = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Classify this sentiment: vLLM is wonderful!"}],
            temperature=0,
            max_tokens=8,
        )
        assert parts.choices[0].message.content == plain.choices[0].message.content
        completion = client.chat.completions.create(  # "Extra Parameters": a structured-output extension
            model=model,
            messages=[{"role": "user", "content": "Classify this sentiment: vLLM is wonderful!"}],
            extra_body={"guided_choice": ["positive", "negative"]},
        )
        assert completion.choices[0].message.content in ("positive", "negative")
        top_k = client.completions.create(
            model=model, prompt="Hello", max_tokens=5, seed=3, extra_body={"top_k": 1}
        )
        assert top_k.choices[0].text == offline("Hello", 5, None)  # top_k=1 is greedy
        completion = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Classify this sentiment: vLLM is wonderful!"}],
            extra_headers={"x-request-id": "sentiment-classification-00001"},
        )
        assert completion._request_id == "sentiment-classification-00001"
        completion = client.completions.create(
            model=model,
            prompt="A robot may not injure a human being",
            extra_headers={"x-request-id": "completion-test"},
        )
        assert completion._request_id == "completion-test"
        # /tokenize and /detokenize (vLLM's Tokenizer API)
        headers = {"Authorization": "Bearer token-abc123"}
        tokens = httpx.post(
            f"{server.url}/tokenize", json={"model": model, "prompt": "Hello!"}, headers=headers
        ).json()
        assert tokens["count"] == len(tokens["tokens"]) > 0
        text = httpx.post(
            f"{server.url}/detokenize", json={"model": model, "tokens": tokens["tokens"]}, headers=headers
        )
        assert text.json() == {"prompt": "Hello!"}
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()
    finally:
        server.stop()
