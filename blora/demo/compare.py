"""``blora demo --compare``: the same rows through transformers + PEFT, one batch with ``adapter_names``.

PEFT's mixed batch is a static ``generate`` call: every row runs until the longest one ends. Only the
tokens each row really produced count (up to and including its EOS), exactly as for blora, so the two
tok/s figures measure the same useful work.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from blora.demo.streams import Row

PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


@dataclass
class PeftResult:
    token_ids: list[list[int]]  # per row, up to and including its EOS
    seconds: float

    @property
    def generated(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0


def demo_peft_model(model):
    """``model`` wrapped in a ``PeftModel`` holding the four demo adapters, named as in the demo."""
    from peft import PeftModel

    from blora.demo.behaviours import ADAPTER_NAMES, adapter_path

    first, *rest = ADAPTER_NAMES
    with warnings.catch_warnings():  # PEFT calls a transformers method deprecated for v6; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft = PeftModel.from_pretrained(model, str(adapter_path(first)), adapter_name=first)
        for name in rest:
            peft.load_adapter(str(adapter_path(name)), adapter_name=name)
    return peft.eval()


def run_peft(model, tok, prompt_ids: list[int], rows: list[Row], max_tokens: int) -> PeftResult:
    """Greedy ``generate(adapter_names=...)`` of every row in one batch (after a 2-token warm-up)."""
    from blora.engine.llm_engine import eos_token_ids

    peft = demo_peft_model(model)
    names = [r.adapter or PEFT_BASE for r in rows]
    ids = torch.tensor([prompt_ids] * len(rows), device=model.device)  # same prompt: no padding
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        peft.generate(ids, max_new_tokens=2, adapter_names=names, **kw)
        start = time.perf_counter()
        out = peft.generate(ids, max_new_tokens=max_tokens, adapter_names=names, **kw)
        seconds = time.perf_counter() - start
    eos = eos_token_ids(model, tok)
    return PeftResult([_until_eos(row, eos) for row in out[:, ids.shape[1] :].tolist()], seconds)


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def compare_line(
    mode: str, blora_tok_s: float, blora_tokens: int, peft: PeftResult, rows: list[Row], exact: bool
) -> str:
    """The one line ``--compare`` prints: both tok/s, the ratio and what was counted; with ``exact``
    (float32, where both compute the same numbers) also in how many rows the tokens agree. In bf16/fp16
    PEFT rounds the LoRA terms differently (bf16 products, scale applied last), so greedy texts may part."""
    ratio = blora_tok_s / peft.tokens_per_s if peft.tokens_per_s else float("inf")
    line = (
        f"blora {mode} {blora_tok_s:.1f} tok/s vs transformers + PEFT (one batch, adapter_names) "
        f"{peft.tokens_per_s:.1f} tok/s: {ratio:.2f}x; counted: each row's tokens up to and including its "
        f"EOS (blora {blora_tokens}, PEFT {peft.generated})"
    )
    if exact:
        same = sum(r.token_ids == ids for r, ids in zip(rows, peft.token_ids, strict=True))
        line += f"; same tokens as PEFT in {same}/{len(rows)} rows"
    return line
