"""One measurement of one system, run in its own process (``python -m blora.bench.throughput --child``).

Each runner sets its system up (model, adapters, a warm-up) and returns a function that times one run:
``{"seconds": ..., "ttft_s": ...}``. Every request generates exactly ``new_tokens`` tokens (EOS ignored),
greedy, so the systems do the same work; TTFT is the mean over requests (for a static batch, the batch's
first step).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from blora.bench.workload import chat_prompts

LABELS = {
    "transformers": "transformers generate, base-only",
    "engine": "blora engine, base-only",
    "engine-lora": "blora engine, {k}",
    "peft-mixed": "PEFT mixed batch, {k}",
    "peft-serial": "PEFT one adapter at a time, {k}",
}


def label(system: str, k: int) -> str:
    """The row label of ``system`` with ``k`` distinct adapters: "blora engine, 16 adapters"."""
    return LABELS[system].format(k=f"{k} adapter" + ("" if k == 1 else "s"))


Run = Callable[[], dict]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MiB; NaN where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def workload(tok, args) -> tuple[list[str], list[str | None]]:
    """The prompts and, per prompt, its adapter (round-robin over ``args.k``; None when k = 0)."""
    n = max(args.requests, args.k)
    texts = chat_prompts(tok, n)
    names: list[str | None] = [None] * n if args.k == 0 else [f"bench-{i % args.k:03d}" for i in range(n)]
    return texts, names


def run_engine(loaded, args, paths) -> Run:
    from blora.engine import LLM, SamplingParams

    texts, names = workload(loaded.tokenizer, args)
    adapters = {p.name: str(p) for p in paths[: args.k]}
    caching = not getattr(args, "no_prefix_caching", False)
    llm = LLM(
        loaded, adapters=adapters, max_loras=max(16, args.k), max_num_seqs=max(64, len(texts)),
        enable_prefix_caching=caching,
    )  # fmt: skip
    warm = list(dict.fromkeys(names))  # loads every adapter (they load on first use)
    llm.generate(["Hi"] * len(warm), SamplingParams(max_tokens=2, temperature=0), adapters=warm)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    def run() -> dict:
        llm.reset_prefix_cache()  # every timed run computes its prompts, as transformers and PEFT do
        start = time.time()
        outs = llm.generate(texts, params, adapters=names)
        seconds = time.time() - start
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
        firsts = [o.metrics.first_token_time for o in outs]
        assert all(t is not None for t in firsts)  # every request produced its tokens
        ttft = [t - start for t in firsts if t is not None]
        return {"seconds": seconds, "ttft_s": sum(ttft) / len(ttft)}

    return run


class FirstToken:
    """Logits processor that notes when the first token's logits are ready (= the batch's TTFT)."""

    def __init__(self) -> None:
        self.time: float | None = None

    def __call__(self, input_ids, scores):
        if self.time is None:
            self.time = time.perf_counter()
        return scores


def static_generate(model, tok, texts, new_tokens: int, **kw) -> tuple[float, float]:
    """(seconds, seconds to first token) of one left-padded ``generate`` call of exactly ``new_tokens``."""
    from transformers import LogitsProcessorList

    from blora import prepare_batch

    batch = prepare_batch([(t, None) for t in texts], tok, model, {})
    batch.pop("adapter_ids")
    first = FirstToken()
    start = time.perf_counter()
    out = model.generate(
        **batch,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([first]),
        **kw,
    )
    assert out.shape[1] == batch["input_ids"].shape[1] + new_tokens
    assert first.time is not None  # the processor ran for the first token
    return time.perf_counter() - start, first.time - start


def run_transformers(loaded, args, paths) -> Run:
    texts, _ = workload(loaded.tokenizer, args)
    static_generate(loaded.model, loaded.tokenizer, texts[:4], 2)

    def run() -> dict:
        seconds, ttft = static_generate(loaded.model, loaded.tokenizer, texts, args.new_tokens)
        return {"seconds": seconds, "ttft_s": ttft}

    return run


def peft_model(model, paths: list[Path], k: int):
    """A ``PeftModel`` over a copy of ``model`` with the first ``k`` adapters, named after their dirs."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(paths[0]), adapter_name=paths[0].name)
    for p in paths[1:k]:
        peft.load_adapter(str(p), adapter_name=p.name)
    return peft.eval()


def run_peft_mixed(loaded, args, paths) -> Run:
    texts, names = workload(loaded.tokenizer, args)
    model, tok = peft_model(loaded.model, paths, args.k), loaded.tokenizer
    static_generate(model, tok, texts[:4], 2, adapter_names=names[:4])

    def run() -> dict:
        seconds, ttft = static_generate(model, tok, texts, args.new_tokens, adapter_names=names)
        return {"seconds": seconds, "ttft_s": ttft}

    return run


def run_peft_serial(loaded, args, paths) -> Run:
    texts, names = workload(loaded.tokenizer, args)
    model, tok = peft_model(loaded.model, paths, args.k), loaded.tokenizer
    static_generate(model, tok, texts[:2], 2)

    def run() -> dict:
        start, ttfts = time.perf_counter(), []
        for name in dict.fromkeys(names):
            group = [t for t, n in zip(texts, names, strict=True) if n == name]
            model.set_adapter(name)
            offset = time.perf_counter() - start
            _, ttft = static_generate(model, tok, group, args.new_tokens)
            ttfts += [offset + ttft] * len(group)
        return {"seconds": time.perf_counter() - start, "ttft_s": sum(ttfts) / len(ttfts)}

    return run


RUNNERS: dict[str, Callable] = {
    "transformers": run_transformers,
    "engine": run_engine,
    "engine-lora": run_engine,
    "peft-mixed": run_peft_mixed,
    "peft-serial": run_peft_serial,
}


def child(args: argparse.Namespace) -> dict:
    """Measure ``args.system``: best of ``args.runs`` timed runs after a warm-up; prints a RESULT line."""
    from blora.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype)
    paths = sorted(Path(args.adapter_dir).glob("bench-*"))
    with torch.inference_mode():
        run = RUNNERS[args.system](loaded, args, paths)
        runs = [run() for _ in range(args.runs)]
    result = min(runs, key=lambda r: r["seconds"])  # best of --runs: the least disturbed by other load
    result["runs_s"] = [round(r["seconds"], 3) for r in runs]
    n = max(args.requests, args.k)
    result.update(
        system=args.system,
        label=label(args.system, args.k),
        dtype=args.dtype,
        adapters=args.k,
        requests=n,
        new_tokens=args.new_tokens,
        tok_s=n * args.new_tokens / result["seconds"],
        peak_rss_mb=peak_rss_mb(),
        threads=args.threads,
    )
    print("RESULT " + json.dumps(result), flush=True)
    return result
