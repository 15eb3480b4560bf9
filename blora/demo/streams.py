"""The demo's two ways of running its rows: the engine (``LLM.stream``) and library mode
(``load_loras`` / ``prepare_batch`` / ``generate(stream_output=True)``).

Both fill the same ``Row`` objects as tokens arrive and call ``on_update()`` after each change, so the
view and the summary do not care which path produced them. Both are greedy, stop a row at EOS
("stop") or after ``max_tokens`` ("length"), and count a row's tokens up to and including its EOS.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

Update = Callable[[], None]


@dataclass
class Row:
    """One row of the demo batch: the question through one adapter (None = the base model)."""

    label: str
    adapter: str | None
    token_ids: list[int] = field(default_factory=list)  # generated, including the EOS that ended it
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS) | "length" (max tokens)
    first_token_s: float | None = None  # seconds from the start of the run
    finished_s: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def progress(self, now: float, finish_reason: str | None) -> None:
        if self.first_token_s is None and self.token_ids:
            self.first_token_s = now
        if finish_reason and not self.done:
            self.finish_reason, self.finished_s = finish_reason, now


def run_engine(llm, prompt_ids: list[int], rows: list[Row], max_tokens: int, on_update: Update) -> float:
    """Stream every row through the engine (continuous batching: a finished row leaves the batch).

    Returns the wall time of the run. Rows are told apart by adapter, so each row needs its own."""
    from blora.engine import SamplingParams

    by_adapter = {row.adapter: row for row in rows}
    if len(by_adapter) != len(rows):
        raise ValueError("the demo's rows must each use a different adapter (or the base model once)")
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    start = time.time()
    for out in llm.stream([prompt_ids] * len(rows), params, adapters=[r.adapter for r in rows]):
        row, completion = by_adapter[out.adapter], out.outputs[0]
        row.token_ids, row.text = list(completion.token_ids), completion.text
        row.progress(time.time() - start, completion.finish_reason)
        on_update()
    return time.time() - start


def run_library(
    model, tok, lora_map, prompt: str, rows: list[Row], max_tokens: int, on_update: Update
) -> float:
    """Stream every row through library mode: one static batch, one token per row per step, until the
    longest row ends (a finished row's later tokens are padding and are not counted)."""
    from blora.engine.llm_engine import eos_token_ids
    from blora.library import prepare_batch

    batch = prepare_batch([(prompt, r.adapter) for r in rows], tok, model, lora_map, add_special_tokens=False)
    eos = eos_token_ids(model, tok)
    start = time.perf_counter()
    stream = model.generate(
        **batch,
        max_new_tokens=max_tokens,
        do_sample=False,
        stream_output=True,
        pad_token_id=tok.eos_token_id,
    )
    for step in stream:
        now = time.perf_counter() - start
        for row, token in zip(rows, step.tolist(), strict=True):
            if row.done:
                continue
            row.token_ids.append(token)
            row.text = tok.decode(row.token_ids, skip_special_tokens=True)
            reason = "stop" if token in eos else "length" if len(row.token_ids) >= max_tokens else None
            row.progress(now, reason)
        on_update()
    return time.perf_counter() - start
