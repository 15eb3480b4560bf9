"""``blora demo``: the default model, the base and four demo adapters in ONE batch, streamed side by side.

Every row is the same question routed through a different adapter (or none). By default the rows go
through the engine (``LLM.stream``, continuous batching: each row ends on its own, at EOS or at
``max_new_tokens``); ``library=True`` runs them through the BLoRA-compatible library API instead
(``load_loras`` / ``prepare_batch`` / ``generate(stream_output=True)``). The terminal shows one panel per
row updating live (a plain log when stdout is not a terminal), then tok/s and time to first token.
``compare=True`` then runs the same rows through transformers + PEFT and prints one comparison line.
Both runs follow a one-token warm-up (adapters loaded, kernels built), so neither pays for set-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from blora.demo.behaviours import ADAPTER_NAMES, BEHAVIOURS, adapter_path, check_behaviour
from blora.demo.compare import PeftResult, compare_line, run_peft
from blora.demo.streams import Row, run_engine, run_library
from blora.demo.view import LiveView, PlainLog
from blora.models import load_model

DEFAULT_QUESTION = "Why do cats purr?"
COUNTED = "each row's tokens up to and including its EOS"


@dataclass
class DemoResult:
    rows: list[Row]
    seconds: float
    mode: str  # "engine" | "library"
    peft: PeftResult | None = None

    @property
    def generated(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0

    @property
    def ttft(self) -> float:
        """Mean over rows of the seconds from the start of the run to the row's first token."""
        firsts = [r.first_token_s for r in self.rows if r.first_token_s is not None]
        return sum(firsts) / len(firsts) if firsts else 0.0


def demo_rows() -> list[Row]:
    return [Row("base model", None)] + [Row(f"{n}: {BEHAVIOURS[n]}", n) for n in ADAPTER_NAMES]


def run_demo(
    question: str = DEFAULT_QUESTION,
    *,
    max_new_tokens: int = 96,
    dtype: str | None = None,
    device: str | None = None,
    live: bool | None = None,
    library: bool = False,
    compare: bool = False,
    console=None,
) -> DemoResult:
    """Run the demo (printing to ``console``, default stdout) and return its rows and timings."""
    from rich.console import Console

    console = console or Console()
    live = console.is_terminal if live is None else live
    mode = "library" if library else "engine"
    console.print(
        f"[bold]blora demo[/bold] ({mode}): loading SmolLM2-135M-Instruct and {len(ADAPTER_NAMES)} adapters..."
    )
    loaded = load_model(dtype=dtype, device=device)
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(prompt, str)  # tokenize=False: the rendered text
    rows = demo_rows()
    run = _library_runner(loaded, prompt, rows) if library else _engine_runner(loaded, prompt, rows)
    console.print(
        f"model dtype {loaded.model.dtype}, device {loaded.model.device}; question: [italic]{question}[/italic]"
    )
    view = LiveView(rows, console) if live else PlainLog(rows, console)
    with view:
        seconds = run(max_new_tokens, view.update)
    result = DemoResult(rows, seconds, mode)
    _summary(console, result)
    if compare:
        result.peft = _compare(console, result, prompt, max_new_tokens, dtype, device)
    return result


def _engine_runner(loaded, prompt: str, rows: list[Row]):
    from blora.engine import LLM, SamplingParams

    adapters = {n: str(adapter_path(n)) for n in ADAPTER_NAMES}
    llm = LLM(loaded, adapters=adapters, max_loras=len(adapters))
    prompt_ids = loaded.tokenizer(prompt, add_special_tokens=False).input_ids
    routes = [r.adapter for r in rows]
    llm.generate([prompt_ids] * len(rows), SamplingParams(max_tokens=1, temperature=0), adapters=routes)
    return lambda max_tokens, update: run_engine(llm, prompt_ids, rows, max_tokens, update)


def _library_runner(loaded, prompt: str, rows: list[Row]):
    import torch

    from blora.library import load_loras, prepare_batch

    tok = loaded.tokenizer
    model, lora_map = load_loras(loaded.model, {n: adapter_path(n) for n in ADAPTER_NAMES})
    batch = prepare_batch([(prompt, r.adapter) for r in rows], tok, model, lora_map, add_special_tokens=False)
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=tok.eos_token_id)
    return lambda max_tokens, update: run_library(model, tok, lora_map, prompt, rows, max_tokens, update)


def _summary(console, result: DemoResult) -> None:
    console.print(
        f"\n[bold]{len(result.rows)} rows in one batch ({result.mode})[/bold]: {result.generated} tokens in "
        f"{result.seconds:.2f} s = [bold]{result.tokens_per_s:.1f} tok/s[/bold] ({COUNTED}); "
        f"time to first token {result.ttft * 1000:.0f} ms (mean over rows)",
        highlight=False,
        soft_wrap=True,
    )
    for row in result.rows:
        if row.adapter:
            ok = check_behaviour(row.adapter, row.text)
            console.print(f"  {row.adapter:7s} shows its behaviour: {'yes' if ok else 'no'}")


def _compare(console, result: DemoResult, prompt: str, max_tokens: int, dtype, device) -> PeftResult:
    import torch

    console.print(
        "\nthe same rows through transformers + PEFT (one batch, generate(adapter_names=...))...",
        soft_wrap=True,
    )
    loaded = load_model(dtype=dtype, device=device)  # a fresh copy: blora's run changed its modules
    prompt_ids = loaded.tokenizer(prompt, add_special_tokens=False).input_ids
    peft = run_peft(loaded.model, loaded.tokenizer, prompt_ids, result.rows, max_tokens)
    exact = loaded.model.dtype == torch.float32
    line = compare_line(result.mode, result.tokens_per_s, result.generated, peft, result.rows, exact)
    console.print(line, highlight=False, markup=False, soft_wrap=True)
    return peft
