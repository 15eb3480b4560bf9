"""``blora demo`` (engine, ``--library``, ``--compare``) and ``blora bench`` (tiny mode).

The demo runs are the real thing: the embedded SmolLM2 with the four demo adapters, float32, greedy, a few
tokens. With 24 new tokens the ``brief`` adapter ends its one-sentence answer (EOS) after 15 tokens while
the other rows run to the limit, so a row ending on its own is observable. Correctness: the engine's rows
must equal PEFT's (``--compare`` runs it) and library mode's, token for token.
"""

from __future__ import annotations

import json
from io import StringIO

import pytest
from rich.console import Console

from blora.bench.report import table
from blora.bench.throughput import plan
from blora.cli import main
from blora.demo.compare import PeftResult, _until_eos, compare_line
from blora.demo.streams import Row
from blora.demo.view import LiveView, PlainLog

MAX_TOKENS = 24


def _console(terminal: bool) -> Console:
    return Console(file=StringIO(), force_terminal=terminal, width=240, color_system=None)


@pytest.fixture(scope="module")
def engine_run(one_thread):
    """``blora demo --compare`` through the engine, plain log (one thread: see ``one_thread``)."""
    from blora.demo.run import run_demo

    console = _console(terminal=False)
    result = run_demo(max_new_tokens=MAX_TOKENS, dtype="float32", live=False, compare=True, console=console)
    return result, console.file.getvalue()


def _row(result, adapter):
    return next(r for r in result.rows if r.adapter == adapter)


@pytest.mark.slow
def test_engine_rows_end_on_their_own(engine_run):
    result, log = engine_run
    assert result.mode == "engine"
    brief, others = _row(result, "brief"), [r for r in result.rows if r.adapter != "brief"]
    assert brief.finish_reason == "stop" and len(brief.token_ids) < MAX_TOKENS, brief
    assert all(r.finish_reason == "length" and len(r.token_ids) == MAX_TOKENS for r in others)
    assert brief.finished_s < min(r.finished_s for r in others), "brief ended while the others ran on"
    # the log says so, in that order, with each row's finish reason
    ended = [line for line in log.splitlines() if " ended: " in line]
    assert len(ended) == len(result.rows)
    assert ended[0].startswith("[brief:") and "stop (EOS)" in ended[0]
    assert all("length (max tokens)" in line for line in ended[1:])


@pytest.mark.slow
def test_engine_summary_counts_real_tokens(engine_run):
    result, log = engine_run
    assert result.generated == sum(len(r.token_ids) for r in result.rows) == 4 * MAX_TOKENS + 15
    assert 0 < result.ttft < result.seconds
    assert f"{result.generated} tokens in" in log and "tok/s" in log and "time to first token" in log
    assert "caps    shows its behaviour: yes" in log


@pytest.mark.slow
def test_compare_matches_peft_token_for_token(engine_run):
    result, log = engine_run
    assert result.peft is not None
    for row, peft_ids in zip(result.rows, result.peft.token_ids, strict=True):
        assert row.token_ids == peft_ids, f"{row.label}: engine {row.token_ids} vs PEFT {peft_ids}"
    line = next(ln for ln in log.splitlines() if ln.startswith("blora engine "))
    assert "tok/s vs transformers + PEFT (one batch, adapter_names)" in line
    assert f"(blora {result.generated}, PEFT {result.peft.generated})" in line
    assert "same tokens as PEFT in 5/5 rows" in line
    assert f"{result.tokens_per_s / result.peft.tokens_per_s:.2f}x" in line


@pytest.mark.slow
def test_library_mode_matches_the_engine_and_shows_live_panels(engine_run, one_thread):
    from blora.demo.run import run_demo

    engine, _ = engine_run
    console = _console(terminal=True)
    result = run_demo(max_new_tokens=MAX_TOKENS, dtype="float32", live=True, library=True, console=console)
    assert result.mode == "library"
    for lib, eng in zip(result.rows, engine.rows, strict=True):
        assert lib.token_ids == eng.token_ids, f"{lib.label}: library {lib.text!r} vs engine {eng.text!r}"
        assert lib.finish_reason == eng.finish_reason
    screen = console.file.getvalue()
    assert "stop (EOS), 15 tokens" in screen and f"length (max tokens), {MAX_TOKENS} tokens" in screen
    assert "rows in one batch (library)" in screen


# -- fast checks: the view, the counting, the CLI wiring, the bench plan and table --------------------


def test_live_panels_show_progress_and_finish_reasons():
    rows = [
        Row("base model", None, [1, 2, 3], "Hello [/bold] there", "length", 0.1, 1.5),
        Row("brief: one sentence", "brief", [5, 2], "One sentence.", "stop", 0.1, 0.7),
        Row("caps: upper case", "caps", [4], "HI"),
    ]
    console = _console(terminal=True)
    with LiveView(rows, console) as view:
        view.update()
    screen = console.file.getvalue()
    assert "length (max tokens), 3 tokens, 1.50 s" in screen
    assert "stop (EOS), 2 tokens, 0.70 s" in screen
    assert "1 tokens..." in screen and "Hello [/bold] there" in screen  # model text is not markup


def test_plain_log_reports_each_row_once_when_it_ends():
    rows = [Row("a", None), Row("b", "b")]
    console = _console(terminal=False)
    with PlainLog(rows, console) as log:
        rows[1].token_ids, rows[1].finish_reason, rows[1].finished_s = [7, 2], "stop", 0.5
        log.update()
        log.update()
        rows[0].token_ids, rows[0].finish_reason, rows[0].finished_s = [1, 1, 1], "length", 0.9
        log.update()
    lines = [ln for ln in console.file.getvalue().splitlines() if " ended: " in ln]
    assert lines == [
        "[b] ended: stop (EOS), 2 tokens, 0.50 s",
        "[a] ended: length (max tokens), 3 tokens, 0.90 s",
    ]


def test_until_eos_counts_the_eos_and_drops_the_padding():
    assert _until_eos([5, 6, 2, 2, 2], {2}) == [5, 6, 2]
    assert _until_eos([5, 6, 7], {2}) == [5, 6, 7]
    assert _until_eos([2, 2], {2, 9}) == [2]


def test_compare_line_counts_and_agreement():
    rows = [Row("a", None, [5, 2]), Row("b", "b", [6, 7, 8])]
    peft = PeftResult([[5, 2], [6, 7, 9]], seconds=2.0)
    line = compare_line("engine", 10.0, 5, peft, rows, exact=True)
    assert line == (
        "blora engine 10.0 tok/s vs transformers + PEFT (one batch, adapter_names) 2.5 tok/s: 4.00x; "
        "counted: each row's tokens up to and including its EOS (blora 5, PEFT 5); "
        "same tokens as PEFT in 1/2 rows"
    )
    assert "same tokens" not in compare_line("engine", 10.0, 5, peft, rows, exact=False)


def test_demo_flags_reach_run_demo(monkeypatch):
    seen = {}
    monkeypatch.setattr("blora.demo.run.run_demo", lambda question, **kw: seen.update(kw, question=question))
    assert main(["demo", "Hi?", "--library", "--compare", "--max-tokens", "5", "--no-live"]) == 0
    assert seen["library"] and seen["compare"] and seen["max_new_tokens"] == 5 and seen["live"] is False
    assert main(["demo"]) == 0
    assert not seen["library"] and not seen["compare"] and seen["question"] == "Why do cats purr?"


def _bench_args(*argv: str):
    import argparse

    from blora.bench.throughput import add_bench_arguments

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_plan():
    assert plan(_bench_args()) == [
        ("transformers", 0), ("engine", 0), ("engine-lora", 16), ("peft-mixed", 16),
        ("engine-lora", 1), ("peft-mixed", 1), ("engine-lora", 4), ("peft-mixed", 4),
    ]  # fmt: skip
    assert plan(_bench_args("--adapters", "4", "--sweep", "4", "8", "--skip-peft")) == [
        ("transformers", 0), ("engine", 0), ("engine-lora", 4), ("engine-lora", 8),
    ]  # fmt: skip
    assert ("peft-serial", 16) in plan(_bench_args("--peft-serial"))


def test_bench_table_ratios_come_from_the_same_dtype():
    def row(system, dtype, k, tok_s):
        return dict(
            system=system, dtype=dtype, adapters=k, tok_s=tok_s, label=system, ttft_s=0.5, peak_rss_mb=1
        )

    rows = [
        row("transformers", "bfloat16", 0, 100.0), row("engine", "bfloat16", 0, 200.0),
        row("engine-lora", "bfloat16", 4, 150.0), row("peft-mixed", "bfloat16", 4, 50.0),
        row("peft-mixed", "bfloat16", 1, 75.0), row("transformers", "float32", 0, 10.0),
    ]  # fmt: skip
    lines = table(rows, adapters=4).splitlines()
    assert lines[4] == "| bfloat16 | engine-lora | 150.0 | 1.50x | 0.75x | 3.00x | 0.50 | 1 |"
    assert lines[6] == "| bfloat16 | peft-mixed | 75.0 | 0.75x | 0.38x | 1.50x | 0.50 | 1 |"
    assert lines[7] == "| float32 | transformers | 10.0 | 1.00x | - | - | 0.50 | 1 |"


def test_bench_tiny_runs_every_system(tmp_path, capsys):
    """The whole pipeline (a subprocess per system, table, JSON, plot) on a tiny random model."""
    out = tmp_path / "throughput"
    argv = [
        "bench",
        "--tiny",
        "--threads",
        "1",
        "--out",
        str(out),
        "--adapter-cache",
        str(tmp_path / "cache"),
    ]
    assert main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["system"], r["adapters"]) for r in rows] == [
        ("transformers", 0), ("engine", 0), ("engine-lora", 2), ("peft-mixed", 2),
    ]  # fmt: skip
    assert all(r["tok_s"] > 0 and r["requests"] == 4 and r["new_tokens"] == 4 for r in rows)
    md = out.with_suffix(".md").read_text()
    assert "| blora engine, 2 adapters |" in md and md.strip() in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
