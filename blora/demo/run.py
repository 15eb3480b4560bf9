"""``blora demo``: the default model, the base and four demo adapters in ONE batch, streamed side by side.

Every row of the batch is the same question routed through a different adapter (or none); one
``generate`` call produces one token per row per step, and the terminal shows one panel per row updating
live (a plain log when stdout is not a terminal). Ends with throughput and time to first token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from blora.demo.behaviours import ADAPTER_NAMES, BEHAVIOURS, adapter_path, check_behaviour
from blora.library import load_loras, prepare_batch
from blora.models import load_model

DEFAULT_QUESTION = "Why do cats purr?"


@dataclass
class Row:
    label: str
    adapter: str | None
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    text: str = ""


@dataclass
class DemoResult:
    rows: list[Row]
    seconds: float
    ttft: float
    generated: int

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0


def run_demo(
    question: str = DEFAULT_QUESTION,
    *,
    max_new_tokens: int = 96,
    dtype: str | None = None,
    device: str | None = None,
    live: bool | None = None,
) -> DemoResult:
    from rich.console import Console

    console = Console()
    live = console.is_terminal if live is None else live
    console.print(
        f"[bold]blora demo[/bold]: loading SmolLM2-135M-Instruct and {len(ADAPTER_NAMES)} adapters..."
    )
    loaded = load_model(dtype=dtype, device=device)
    model, tok = loaded.model, loaded.tokenizer
    model, lora_map = load_loras(model, {name: adapter_path(name) for name in ADAPTER_NAMES})
    rows = [Row("base model", None)] + [Row(f"{n}: {BEHAVIOURS[n]}", n) for n in ADAPTER_NAMES]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    batch = prepare_batch([(prompt, r.adapter) for r in rows], tok, model, lora_map, add_special_tokens=False)
    console.print(f"model dtype {model.dtype}, device {model.device}; question: [italic]{question}[/italic]")
    stream = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        stream_output=True,
        pad_token_id=tok.eos_token_id,
    )
    result = _consume(stream, rows, tok, console, live)
    _summary(console, result)
    return result


def _consume(stream, rows: list[Row], tok, console, live: bool) -> DemoResult:
    eos = tok.eos_token_id
    start = time.perf_counter()
    ttft = 0.0
    generated = 0
    view = _LiveView(rows, console) if live else None
    with view or _Null():
        for step, out in enumerate(stream):
            if step == 0:
                ttft = time.perf_counter() - start
            for row, token in zip(rows, out.tolist(), strict=True):
                if row.done:
                    continue
                if token == eos:
                    row.done = True
                    continue
                row.tokens.append(token)
                generated += 1
            for row in rows:
                row.text = tok.decode(row.tokens, skip_special_tokens=True)
            if view:
                view.refresh()
            elif step % 16 == 0:
                console.print(f"step {step + 1}: {sum(len(r.tokens) for r in rows)} tokens so far")
    seconds = time.perf_counter() - start
    if not live:
        for row in rows:
            console.print(f"\n[bold]{row.label}[/bold]\n{row.text}", highlight=False)
    return DemoResult(rows=rows, seconds=seconds, ttft=ttft, generated=generated)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class _LiveView:
    """One rich panel per row, redrawn after every decode step."""

    def __init__(self, rows: list[Row], console) -> None:
        from rich.live import Live

        self.rows = rows
        self.live = Live(self._render(), console=console, refresh_per_second=12, transient=False)

    def _render(self):
        from rich.columns import Columns
        from rich.panel import Panel

        width = max(28, (self.live.console.width if hasattr(self, "live") else 120) // 3 - 2)
        panels = [
            Panel(r.text or "...", title=r.label, width=width, border_style="green" if r.done else "cyan")
            for r in self.rows
        ]
        return Columns(panels)

    def refresh(self) -> None:
        self.live.update(self._render())

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.refresh()
        self.live.__exit__(*exc)


def _summary(console, result: DemoResult) -> None:
    console.print(
        f"\n[bold]{len(result.rows)} rows in one batch[/bold]: {result.generated} tokens in "
        f"{result.seconds:.2f} s = [bold]{result.tokens_per_s:.1f} tok/s[/bold]; "
        f"time to first token {result.ttft * 1000:.0f} ms"
    )
    for row in result.rows:
        if row.adapter:
            ok = check_behaviour(row.adapter, row.text)
            console.print(f"  {row.adapter:7s} shows its behaviour: {'yes' if ok else 'no'}")
