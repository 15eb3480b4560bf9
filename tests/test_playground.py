"""The playground page (``GET /``) driven in headless Chromium against a real server process.

A tiny random Llama (SmolLM2 tokenizer) and three PEFT adapters are served by ``python -m blora.server``
on 127.0.0.1; Debian's ``chromium`` opens the page and is driven over the Chrome DevTools Protocol through
``--remote-debugging-pipe`` (NUL-separated JSON on file descriptors 3 and 4: no websocket library, no
driver binary). Every expected answer comes from the server's own non-streaming API.

Regenerate the README screenshot (any ``blora serve`` arguments after ``--``)::

    .venv/bin/python -m tests.test_playground docs/playground.png -- --lora-modules caps=... pirate=...
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import torch

from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-llama"
KEY = "playground-key"
ADAPTERS = ("alpha", "beta", "gamma")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--mute-audio", "--hide-scrollbars", "--remote-debugging-pipe",
]  # fmt: skip


def chromium_binary() -> str | None:
    """``$BLORA_CHROMIUM``, else Debian's ``chromium`` (or ``chromium-browser``) on PATH."""
    return os.environ.get("BLORA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


# --- Chrome DevTools Protocol over a pipe -----------------------------------------------------------


class CDPError(RuntimeError):
    pass


class Browser:
    """Headless Chromium driven over ``--remote-debugging-pipe``.

    Chromium reads commands from fd 3 and writes replies and events to fd 4, each message one JSON
    object followed by a NUL byte. A reader thread files replies by ``id`` and keeps events.
    """

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        actions = [(os.POSIX_SPAWN_DUP2, to_chrome_r, 3), (os.POSIX_SPAWN_DUP2, from_chrome_w, 4)]
        log = os.open(profile / "chromium.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        actions += [(os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2)]
        args = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
        # Python's own descriptors are close-on-exec: the child keeps only stdio, 3 and 4.
        self.pid = os.posix_spawn(binary, args, os.environ, file_actions=actions)
        for fd in (to_chrome_r, from_chrome_w, log):
            os.close(fd)
        self.log = profile / "chromium.log"
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_chrome, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._cond.notify_all()
        with self._cond:
            self._replies[-1] = {"error": {"message": "chromium closed the pipe"}}
            self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout=30) -> dict:
        with self._cond:
            self._next_id += 1
            msg_id = self._next_id
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: msg_id in self._replies or -1 in self._replies, timeout):
                raise CDPError(f"{method}: no reply within {timeout} s")
            reply = self._replies.pop(msg_id, None) or self._replies[-1]
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')}\n{self.log.read_text()[-2000:]}")
        return reply["result"]

    def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, target)
        for domain in ("Page", "Runtime", "Log"):
            page.send(f"{domain}.enable")
        page.viewport(width, height)
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except CDPError:
            os.kill(self.pid, signal.SIGKILL)
        for _ in range(50):
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self._to_chrome)
        self._reader.join(5)
        os.close(self._from_chrome)


@dataclass
class Page:
    browser: Browser
    session: str
    target: str
    mark: int = field(default=0)  # index into browser.events where this page's current document began

    def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        return self.browser.send(method, params, self.session, timeout)

    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 2 if mobile else 1, "mobile": mobile},
        )

    def goto(self, url: str) -> None:
        self.mark = len(self.browser.events)
        self.send("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete' && !!document.querySelector('#models')")

    def js(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page (promises awaited) and return its JSON value."""
        result = self.send(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.js(expression):
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}; page state: {self.panels()}")

    def set_value(self, selector: str, value: str) -> None:
        """Set an input's value the way typing does (``input`` and ``change`` events)."""
        self.js(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            f" el.value = {json.dumps(value)};"
            " el.dispatchEvent(new Event('input', {bubbles: true}));"
            " el.dispatchEvent(new Event('change', {bubbles: true})); })()"
        )

    def click(self, selector: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def model_ids(self) -> list[str]:
        return self.js("[...document.querySelectorAll('#models input')].map(b => b.value)")

    def panels(self) -> dict[str, dict]:
        """Each panel's state, text, stats and error message, by model."""
        return self.js("""Object.fromEntries([...document.querySelectorAll('article.panel')].map(p => [
            p.dataset.model, {state: p.dataset.state, text: p.querySelector('.out').textContent,
            ttft: p.querySelector('.ttft').textContent, tps: p.querySelector('.tps').textContent,
            tokens: p.querySelector('.tokens').textContent, finish: p.querySelector('.finish').textContent,
            error: p.querySelector('.error-msg')?.textContent ?? null}]))""")

    def problems(self) -> list[str]:
        """Uncaught exceptions, console errors and browser log errors (CSP refusals among them)."""
        out = []
        for event in self.browser.events[self.mark :]:
            method, params = event.get("method"), event.get("params", {})
            if event.get("sessionId") != self.session:
                continue
            if method == "Runtime.exceptionThrown":
                out.append(str(params["exceptionDetails"]))
            elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                out.append(str(params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                if params["entry"]["source"] == "network":
                    continue  # API errors (401, 404) are expected and shown in the page
                out.append(params["entry"]["text"])
        return out

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))


# --- the server -------------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def post(self, path: str, body: dict) -> dict:
        headers = {"Authorization": f"Bearer {KEY}"}
        resp = httpx.post(self.url + path, json=body, headers=headers, timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def in_flight(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        lines = [line for line in text.splitlines() if line.startswith("blora:server_requests_in_flight{")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch(serve_args: list[str], log: Path, env: dict[str, str] | None = None) -> Server:
    """``python -m blora.server`` on a free port of 127.0.0.1, once ``/health`` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "blora.server", "--port", str(port), *serve_args]
    out = log.open("w")
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"server did not become healthy:\n{log.read_text()[-3000:]}")


def write_tiny_model(d: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny random Llama with a long context (the Stop test streams for a while) and three adapters."""
    from transformers import AutoModelForCausalLM

    from tests import helpers

    cfg = helpers.tiny_config("llama", len(helpers.tokenizer()))
    cfg.max_position_embeddings = 4096
    cfg.initializer_range = 0.1  # wide logit gaps: no greedy near-ties between batched and lone runs
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(d / "model")
    helpers.tokenizer().save_pretrained(d / "model")
    targets = [["q_proj", "v_proj"], ["gate_proj", "down_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]]
    adapters = {
        name: helpers.make_adapter(model, d / name, seed=i + 1, r=4 + 2 * i, target_modules=t)
        for i, (name, t) in enumerate(zip(ADAPTERS, targets, strict=True))
    }
    return d / "model", adapters


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; or set BLORA_CHROMIUM)")
    return binary


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    pytest.importorskip("fastapi")
    d = tmp_path_factory.mktemp("playground")
    model, adapters = write_tiny_model(d)
    args = [
        "--model", str(model), "--served-model-name", NAME, "--dtype", "float32", "--device", "cpu",
        "--api-key", KEY, "--lora-modules", *(f"{name}={path}" for name, path in adapters.items()),
    ]  # fmt: skip
    s = launch(args, d / "server.log", env={"OMP_NUM_THREADS": "1"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser(chromium) -> Iterator[Browser]:
    with tempfile.TemporaryDirectory(prefix="blora-chromium-") as profile:
        b = Browser(chromium, Path(profile))
        yield b
        b.close()


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    p = browser.new_page()
    yield p
    assert p.problems() == []
    browser.send("Target.closeTarget", {"targetId": p.target})


def open_page(page: Page, server: Server, query: str = "") -> None:
    """Open the playground, enter the API key and wait for the model list."""
    page.goto(f"{server.url}/{query}")
    page.set_value("#api-key", KEY)
    page.wait(r"/^\d+ models?$/.test(document.querySelector('#models-note').textContent)")


def configure(page: Page, mode: str, prompt: str, temperature: float, max_tokens: int) -> None:
    page.click(f"input[name=mode][value={mode}]")
    page.set_value("#prompt", prompt)
    page.set_value("#temperature", str(temperature))
    page.set_value("#max-tokens", str(max_tokens))


def expected_text(server: Server, mode: str, model: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """The greedy answer and its token count from the non-streaming API."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if mode == "chat":
        r = server.post("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]})
        return r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"]
    r = server.post("/v1/completions", {**body, "prompt": prompt})
    return r["choices"][0]["text"], r["usage"]["completion_tokens"]


# --- behaviour --------------------------------------------------------------------------------------


def test_page_is_self_contained_and_open_without_the_key(server):
    resp = httpx.get(server.url + "/", timeout=30)  # no Authorization: the page itself is public
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "http://" not in resp.text and "https://" not in resp.text, "no external assets or CDN"
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401


def test_model_list_needs_the_api_key(page, server):
    page.goto(server.url + "/")
    note = page.wait("document.querySelector('#models-note.error')?.textContent")
    assert note.startswith("401") and "API key" in note
    page.set_value("#api-key", KEY)
    page.wait("document.querySelectorAll('#models input').length === 4")
    assert page.model_ids() == [NAME, *ADAPTERS]


@pytest.mark.parametrize("mode", ["completion", "chat"])
def test_three_adapters_stream_the_api_greedy_text(page, server, mode):
    prompt, max_tokens = "The capital of France is", 24
    open_page(page, server)
    for name in ADAPTERS:
        page.click(f"#models input[value={name}]")
    configure(page, mode, prompt, 0, max_tokens)
    page.click("#run")
    page.wait("[...document.querySelectorAll('article.panel')].every(p => p.dataset.state === 'done')")
    panels = page.panels()
    assert list(panels) == list(ADAPTERS)
    texts = set()
    for name in ADAPTERS:
        text, tokens = expected_text(server, mode, name, prompt, max_tokens)
        got = panels[name]
        assert got["text"] == text, name
        assert got["tokens"] == str(tokens) and got["finish"] in ("length", "stop")
        assert got["ttft"].endswith(" ms") and got["tps"].endswith(" tok/s"), got
        texts.add(text)
    assert len(texts) == 3, "each adapter answers differently (non-zero B)"
    assert page.js("document.querySelector('#run').disabled") is False


def test_stop_aborts_every_stream(page, server):
    models = ",".join(ADAPTERS)  # preselected through the URL this time
    open_page(page, server, f"?models={models}&mode=completion&prompt=Once%20upon%20a%20time&temperature=0")
    page.set_value("#max-tokens", "3000")
    page.click("#run")
    page.wait(
        "[...document.querySelectorAll('article.panel')].filter(p => p.dataset.state === 'streaming'"
        " && p.querySelector('.out').textContent.length > 0).length === 3"
    )
    assert server.in_flight() == 3, "the three requests run concurrently on the server"
    page.click("#stop")
    page.wait("[...document.querySelectorAll('article.panel')].every(p => p.dataset.state === 'stopped')")
    before = {name: p["text"] for name, p in page.panels().items()}
    deadline = time.monotonic() + 10
    while server.in_flight() and time.monotonic() < deadline:  # the server aborts the requests
        time.sleep(0.1)
    assert server.in_flight() == 0
    time.sleep(0.3)
    assert {name: p["text"] for name, p in page.panels().items()} == before
    assert all(p["error"] is None and p["tokens"] != "0" for p in page.panels().values())
    assert page.js("document.querySelector('#stop').disabled") is True


def test_unknown_model_shows_the_api_error_in_its_panel(page, server):
    open_page(page, server)
    page.click("#models input[value=alpha]")
    page.set_value("#add-model-name", "no-such-adapter")
    page.js("document.querySelector('#add-model').requestSubmit()")
    configure(page, "chat", "Hi", 0, 8)
    page.click("#run")
    page.wait("[...document.querySelectorAll('article.panel')].every(p => p.dataset.state !== 'streaming'"
              " && p.dataset.state !== 'waiting')")  # fmt: skip
    panels = page.panels()
    assert panels["no-such-adapter"]["state"] == "error"
    assert (
        panels["no-such-adapter"]["error"].startswith("404: ")
        and "no-such-adapter" in panels["no-such-adapter"]["error"]
    )
    assert panels["alpha"]["state"] == "done" and panels["alpha"]["text"]


def test_usable_on_a_phone_sized_screen(page, server):
    page.viewport(390, 844, mobile=True)
    open_page(page, server)
    page.click("#select-all")
    configure(page, "completion", "Hello", 0, 8)
    page.click("#run")
    page.wait("[...document.querySelectorAll('article.panel')].every(p => p.dataset.state === 'done')")
    layout = page.js("""({scroll: document.documentElement.scrollWidth, view: window.innerWidth,
        widths: [...document.querySelectorAll('article.panel')].map(p => p.getBoundingClientRect().width)})""")
    assert layout["scroll"] <= layout["view"], "no horizontal scrolling"
    assert len(layout["widths"]) == 4 and min(layout["widths"]) > 0.8 * layout["view"], "panels stack"


# --- screenshot for the README --------------------------------------------------------------------


def screenshot(out: Path, serve_args: list[str], prompt: str, max_tokens: int = 96) -> None:
    """Serve ``serve_args``, run ``prompt`` through every model in the page and save a PNG of the result."""
    binary = chromium_binary()
    if binary is None:
        raise SystemExit("chromium is not installed")
    with tempfile.TemporaryDirectory(prefix="blora-shot-") as tmp:
        server = launch([*serve_args, "--api-key", KEY], Path(tmp) / "server.log")
        browser = Browser(binary, Path(tmp))
        try:
            page = browser.new_page(1400, 900)
            open_page(
                page, server, f"?mode=chat&temperature=0&max_tokens={max_tokens}&prompt={quote(prompt)}"
            )
            page.click("#select-all")
            page.click("#run")
            page.wait(
                "[...document.querySelectorAll('article.panel')].every(p => p.dataset.state === 'done')", 300
            )
            page.screenshot(out)
        finally:
            browser.close()
            server.stop()


if __name__ == "__main__":
    args = sys.argv[1:]
    split = args.index("--") if "--" in args else len(args)
    screenshot(
        Path(args[0]), args[split + 1 :], os.environ.get("PROMPT", "Tell me about the moon in two sentences.")
    )
