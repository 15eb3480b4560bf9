"""The pure parts of ``benchmarks/real_shapes.py`` and ``benchmarks/llamacpp_compare.py`` (no model built,
no server started): the real-shape configs, the ratio tables, how llama-server is asked for adapters, the
peak-memory reading; and ``benchmarks/serve_load.stream_chat`` (the streaming client of llamacpp_compare and
serve_vs_engine) against canned streams of both servers from an in-process aiohttp server."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks import llamacpp_compare as lcc
from benchmarks import real_shapes as rs
from benchmarks import serve_load as sl


@pytest.mark.parametrize(
    ("shape", "params", "arch"),
    [("qwen2.5-0.5b", 494_032_768, "Qwen2ForCausalLM"), ("llama-3.2-1b", 1_235_814_400, "LlamaForCausalLM")],
)
def test_real_shape_configs_have_the_released_parameter_counts(shape: str, params: int, arch: str) -> None:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(rs.model_config(shape))
    assert type(model).__name__ == arch
    assert sum(p.numel() for p in model.parameters()) == params


def test_real_shape_layers_override_keeps_the_widths() -> None:
    full, cut = rs.model_config("qwen2.5-0.5b"), rs.model_config("qwen2.5-0.5b", layers=2, bos=1, eos=2)
    assert (cut.num_hidden_layers, cut.hidden_size, cut.vocab_size) == (2, full.hidden_size, full.vocab_size)
    assert (cut.bos_token_id, cut.eos_token_id) == (1, 2)


def _row(system: str, seconds: list[float], shape: str = "qwen2.5-0.5b") -> rs.Row:
    result = {
        "system": system, "label": system, "dtype": "float32", "adapters": 16, "requests": 32,
        "new_tokens": 64, "runs_s": seconds, "ttft_s": 0.5, "peak_rss_mb": 100.0,
    }  # fmt: skip
    return rs.to_row(shape, [result])


def test_real_shape_rows_take_the_median_run_and_ratios_mark_targets() -> None:
    rows = [
        _row("transformers", [4.0, 3.0, 5.0]),
        _row("engine", [2.0, 1.0, 9.0]),  # median 2.0 s
        _row("engine-lora", [2.5]),
        _row("peft-mixed", [10.0]),
    ]
    assert rows[1].tok_s == pytest.approx(32 * 64 / 2.0)
    ratios = rs.ratios(rows)["qwen2.5-0.5b"]
    assert ratios == pytest.approx(
        {"16 adapters / base": 0.8, "engine base / transformers": 2.0, "16 adapters / PEFT mixed": 4.0}
    )
    md = rs.table(rows)
    assert "| 16 adapters / base | 0.80x | >= 0.92x (missed) |" in md
    assert "| engine base / transformers | 2.00x | >= 1.8x (met) |" in md


def test_llama_server_selects_adapters_with_the_lora_field() -> None:
    llama = lcc.Server("llama.cpp", None, "http://x", prefix_caching=False)  # type: ignore[arg-type]
    blora = lcc.Server("blora", None, "http://y", prefix_caching=False)  # type: ignore[arg-type]
    assert llama.body(3) == {"model": "base", "lora": [{"id": 3, "scale": 1.0}], "cache_prompt": False}
    # unlisted adapters run at scale 0, but an empty list would run every one: base lists one at 0
    assert llama.body(None)["lora"] == [{"id": 0, "scale": 0.0}]
    assert blora.body(3) == {"model": "bench-003"} and blora.body(None) == {"model": "base"}
    assert lcc.request_adapters(5, 2) == [0, 1, 0, 1, 0] and lcc.request_adapters(2, 0) == [None, None]


def test_llama_server_command_loads_every_adapter_unapplied() -> None:
    args = lcc.parse_args(["--concurrency", "1", "8", "--threads", "3"])
    loras = [Path("/g/a.gguf"), Path("/g/b.gguf")]
    cmd = lcc.llama_command(args, Path("/bin/llama-server"), Path("/g/m.gguf"), loras, 1234)
    assert cmd[cmd.index("-np") + 1] == "8" and cmd[cmd.index("-c") + 1] == str(8 * args.ctx_per_slot)
    # one --lora with the paths comma-separated: llama-server keeps only the last of repeated --lora
    assert [cmd[i + 1] for i, x in enumerate(cmd) if x == "--lora"] == ["/g/a.gguf,/g/b.gguf"]
    assert "--lora-init-without-apply" in cmd and cmd[cmd.index("-t") + 1] == "3"


def test_sse_lines_parse_and_errors_raise() -> None:
    chunk = {"choices": [{"delta": {"content": "Hi"}}]}
    assert sl.parse_sse(b"data: " + json.dumps(chunk).encode() + b"\n") == chunk
    assert sl.parse_sse(b"data: [DONE]\n") is None and sl.parse_sse(b"\n") is None
    with pytest.raises(RuntimeError, match="boom"):
        sl.parse_sse(b'data: {"error": {"message": "boom"}}\n')
    with pytest.raises(RuntimeError, match="overloaded"):
        sl.parse_sse(b"error: overloaded\n")


def _sse(*chunks: dict | str) -> list[bytes]:
    """Compact JSON ``data:`` lines (as both servers write them), strings as they are."""
    lines = [c if isinstance(c, str) else "data: " + json.dumps(c, separators=(",", ":")) for c in chunks]
    return [(line + "\n\n").encode() for line in lines]


USAGE = {"completion_tokens": 3, "prompt_tokens": 7, "total_tokens": 10}
# llama-server: a role chunk with null content, content chunks, an empty finish delta, then usage with
# empty choices (its keys sorted, and timings beside the usage).
LLAMA_STREAM = _sse(
    {"choices": [{"delta": {"content": None, "role": "assistant"}, "finish_reason": None, "index": 0}]},
    *(
        {
            "choices": [
                {"delta": {"content": t}, "finish_reason": None, "index": 0, "logprobs": {"content": [lp]}}
            ]
        }
        for t, lp in (
            ("He", {"logprob": -0.5, "token": "He"}),
            ("l", {"logprob": -1.0}),
            ("lo", {"logprob": 0.0}),
        )
    ),
    {"choices": [{"delta": {}, "finish_reason": "length", "index": 0}]},
    {"choices": [], "timings": {"predicted_n": 3}, "usage": USAGE},
    "data: [DONE]",
)
# blora serve: a role chunk with empty content, content chunks, a finish chunk, the usage chunk.
BLORA_STREAM = _sse(
    {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    *({"id": "c", "choices": [{"index": 0, "delta": {"content": t}}]} for t in ("He", "l", "lo")),
    {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
    {"id": "c", "choices": [], "usage": USAGE},
    "data: [DONE]",
)


def _stream_from(lines: list[bytes], status: int = 200, **kw) -> tuple[sl.Streamed, dict]:
    """``sl.stream_chat`` against an in-process server answering ``lines``; (its result, the body sent)."""
    from aiohttp import web

    seen: dict = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.update(await request.json())
        if status != 200:
            return web.Response(status=status, text="no such model")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for line in lines:
            await response.write(line)
        await response.write_eof()
        return response

    async def go() -> sl.Streamed:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            fields = {"model": "base", "lora": [{"id": 1, "scale": 1.0}]}
            return await sl.stream_chat(f"http://127.0.0.1:{port}", fields, "Hi", 3, **kw)
        finally:
            await runner.cleanup()

    return asyncio.run(go()), seen


@pytest.mark.parametrize("stream", [LLAMA_STREAM, BLORA_STREAM], ids=["llama.cpp", "blora"])
@pytest.mark.parametrize("collect_text", [False, True])
def test_stream_chat_reads_both_servers_streams(stream: list[bytes], collect_text: bool) -> None:
    got, body = _stream_from(stream, collect_text=collect_text)
    assert (got.completion_tokens, got.prompt_tokens) == (3, 7) and got.ttft_s > 0
    assert got.text == ("Hello" if collect_text else None) and got.logprobs is None
    assert body["model"] == "base" and body["lora"] == [{"id": 1, "scale": 1.0}]
    assert body["stream"] and body["ignore_eos"] and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "Hi"}] and body["max_tokens"] == 3


def test_stream_chat_asks_for_and_keeps_logprobs() -> None:
    got, body = _stream_from(LLAMA_STREAM, collect_text=True, logprobs=True)
    assert body["logprobs"] is True and got.logprobs == [-0.5, -1.0, 0.0] and got.text == "Hello"
    assert (
        lcc.max_gap(got.logprobs, [-0.5, -1.5, 5.0], 2) == 0.5 and lcc.common_prefix([1, 2, 3], [1, 2]) == 2
    )


@pytest.mark.parametrize("collect_text", [False, True])
def test_stream_chat_raises_on_errors_and_incomplete_streams(collect_text: bool) -> None:
    error = LLAMA_STREAM[:2] + _sse({"error": {"code": 500, "message": "boom"}})
    with pytest.raises(RuntimeError, match="boom"):
        _stream_from(error, collect_text=collect_text)
    with pytest.raises(RuntimeError, match="without content or usage"):
        _stream_from(BLORA_STREAM[:-2], collect_text=collect_text)  # no usage chunk
    with pytest.raises(RuntimeError, match="llama.cpp: HTTP 404: no such model"):
        _stream_from([], status=404, collect_text=collect_text, label="llama.cpp")


def test_peak_memory_reads_vmhwm_of_this_process() -> None:
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc")
    assert lcc.process_tree(os.getpid())[0] == os.getpid()
    status = Path("/proc/self/status").read_text()
    hwm_kib = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:"))
    assert lcc.peak_rss_mib(os.getpid()) >= hwm_kib / 1024 > 0  # later readings only grow


def test_llamacpp_summary_is_the_median_per_server_and_the_ratio() -> None:
    rows = [
        lcc.Measured("blora", 8, 16, 8, tok_s, 100.0, 400, mib)
        for tok_s, mib in ((300.0, 510.0), (500.0, 530.0))
    ] + [lcc.Measured("llama.cpp", 8, 16, 8, tok_s, 900.0, 400, 700.0) for tok_s in (80.0, 100.0)]
    rows.append(lcc.Measured("blora", 8, 16, 8, 400.0, 100.0, 400, 520.0))
    (entry,) = lcc.medians(rows)
    assert entry["blora"]["tok_s"] == 400.0 and entry["llama.cpp"]["tok_s"] == 90.0
    assert entry["blora"]["peak_rss_mib"] == 530.0  # the highest peak over the rounds
    assert entry["ratio"] == pytest.approx(400 / 90)
    md = lcc.table([entry], lcc.parse_args(["--rounds", "3"]), {"blora": 600.0, "llama.cpp": 800.4})
    assert "| 16 | 8 | 400.0 | 90.0 | 4.44x | 100 | 900 | 530 | 700 |" in md
    assert "blora float32 vs llama.cpp GGUF f32" in md and "blora 600 MiB, llama.cpp 800 MiB" in md


def test_quantization_names_the_weights_and_the_results() -> None:
    args = lcc.parse_args(["--quantization", "int4"])
    assert lcc.weights(args) == {
        "blora": "int4 (bfloat16 kernel activations, rest float32)",
        "llama.cpp": "GGUF Q4_0",
    }
    assert args.out.name == "llamacpp_compare-int4" and lcc.parse_args([]).out.name == "llamacpp_compare"
    cmd = lcc.blora_command(args, [], 1234)
    assert cmd[cmd.index("--quantization") + 1] == "int4"
    assert "--quantization" not in lcc.blora_command(lcc.parse_args([]), [], 1234)


def test_serve_vs_engine_table_gives_each_system_its_ratio_to_the_engine() -> None:
    """Medians over rounds of tok/s and TTFT; each ratio is the median of the rounds' own ratios (not the
    ratio of the medians: 0.883 and 0.958 here); ``--table`` prints the same from the saved JSON."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from benchmarks import serve_vs_engine as sve

    rows = [
        sve.Measured(system, 32, 16, tok_s, ttft, 1200)
        for system, tok_s, ttft in (
            ("engine", 500.0, 100.0),  # round 0
            ("async", 450.0, 110.0),
            ("server", 500.0, 130.0),
            ("server-inproc", 450.0, 150.0),
            ("engine", 700.0, 120.0),  # round 1
            ("async", 700.0, 110.0),
            ("server", 560.0, 130.0),
            ("server-inproc", 630.0, 140.0),
        )
    ]
    args = SimpleNamespace(
        dtype="bfloat16", threads=2, new_tokens=64, rounds=2, requests=[32], adapters=[16],
        async_engine=True, before=None, in_process=True,
    )  # fmt: skip
    md = sve.table(rows, args)
    head = "| streams | adapters | engine tok/s | async tok/s | server tok/s | server-inproc tok/s | async / engine |"
    assert head in md
    assert "| 32 | 16 | 600.0 | 575.0 | 530.0 | 540.0 | 0.950 | 0.900 | 0.900 | 110 | 110 | 130 | 145 |" in md
    engine_only = [r for r in rows if r.system in ("engine", "server")]
    only = sve.table(
        engine_only, SimpleNamespace(**{**vars(args), "async_engine": False, "in_process": False})
    )
    assert "async" not in only and "inproc" not in only
    saved = [asdict(r) for r in rows]
    assert sve.table_of(saved, SimpleNamespace(dtype="bfloat16", threads=2, new_tokens=64)) == md


@pytest.mark.parametrize("stream", [LLAMA_STREAM, BLORA_STREAM], ids=["llama.cpp", "blora"])
def test_first_content_is_seen_wherever_the_reads_split_the_bytes(stream: list[bytes]) -> None:
    """``_SSEReader`` notes the first token when the read holding the first non-empty content's first byte
    arrives, for every split of the stream into two reads (the marker straddling them included), and never
    on the role chunk's empty or null content alone."""
    raw = b"".join(stream[:2] + stream[-3:])  # the role chunk, ONE content chunk, finish, usage, [DONE]
    first = raw.index(b'"content":"He"') + len(b'"content":"')  # the byte that shows content follows
    loop = asyncio.new_event_loop()
    try:
        for cut in range(1, len(raw)):
            reader = sl._SSEReader(b"", 0.0, loop.create_future())
            reader.data_received(raw[:cut])
            assert (reader.ttft is not None) == (cut > first), cut
            reader.data_received(raw[cut:])
            assert reader.ttft is not None and b"".join(reader.parts) == raw
    finally:
        loop.close()


def test_http_lines_undo_chunked_encoding() -> None:
    body = b"data: {}\n\ndata: [DONE]\n\n"
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 5]), body[i : i + 5]) for i in range(0, len(body), 5)
    )
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
    assert sl._http_lines(raw) == (200, body.splitlines(keepends=True))
    plain = b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\nnope"
    assert sl._http_lines(plain) == (404, [b"nope"])
