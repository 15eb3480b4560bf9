"""The pure parts of ``benchmarks/real_shapes.py`` and ``benchmarks/llamacpp_compare.py`` (no model built,
no server started): the real-shape configs, the ratio tables, and how llama-server is asked for adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks import llamacpp_compare as lcc
from benchmarks import real_shapes as rs


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
    assert llama.body(None)["lora"] == []  # listed adapters only: base requests run none
    assert blora.body(3) == {"model": "bench-003"} and blora.body(None) == {"model": "base"}
    assert lcc.request_adapters(5, 2) == [0, 1, 0, 1, 0] and lcc.request_adapters(2, 0) == [None, None]


def test_llama_server_command_loads_every_adapter_unapplied() -> None:
    args = lcc.parse_args(["--concurrency", "1", "8", "--threads", "3"])
    loras = [Path("/g/a.gguf"), Path("/g/b.gguf")]
    cmd = lcc.llama_command(args, Path("/bin/llama-server"), Path("/g/m.gguf"), loras, 1234)
    assert cmd[cmd.index("-np") + 1] == "8" and cmd[cmd.index("-c") + 1] == str(8 * args.ctx_per_slot)
    assert [cmd[i + 1] for i, x in enumerate(cmd) if x == "--lora"] == ["/g/a.gguf", "/g/b.gguf"]
    assert "--lora-init-without-apply" in cmd and cmd[cmd.index("-t") + 1] == "3"


def test_sse_lines_parse_and_errors_raise() -> None:
    chunk = {"choices": [{"delta": {"content": "Hi"}}]}
    assert lcc.parse_sse(b"data: " + json.dumps(chunk).encode() + b"\n") == chunk
    assert lcc.parse_sse(b"data: [DONE]\n") is None and lcc.parse_sse(b"\n") is None
    with pytest.raises(RuntimeError, match="boom"):
        lcc.parse_sse(b'data: {"error": {"message": "boom"}}\n')


def test_llamacpp_summary_is_the_median_per_server_and_the_ratio() -> None:
    rows = [lcc.Measured("blora", 8, 16, 8, tok_s, 100.0, 400) for tok_s in (300.0, 500.0, 400.0)] + [
        lcc.Measured("llama.cpp", 8, 16, 8, tok_s, 900.0, 400) for tok_s in (80.0, 100.0)
    ]
    (entry,) = lcc.medians(rows)
    assert entry["blora"]["tok_s"] == 400.0 and entry["llama.cpp"]["tok_s"] == 90.0
    assert entry["ratio"] == pytest.approx(400 / 90)
    md = lcc.table([entry], lcc.parse_args(["--rounds", "3"]))
    assert "| 16 | 8 | 400.0 | 90.0 | 4.44x | 100 | 900 |" in md
