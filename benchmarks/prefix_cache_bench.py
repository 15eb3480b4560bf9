"""Prefix caching on a shared-system-prompt chat workload: TTFT and throughput with and without it.

Workload: ``--requests`` chat requests (default 128) over ``--adapters`` PEFT adapters (default 8, round
robin), every one with the same system prompt of about ``--system-tokens`` tokens (default 400) and its own
short user question (the benchmark prompts of ``blora.bench.workload``), ``--max-tokens`` new tokens each
(EOS ignored), greedy. Requests arrive all at once (``--rate 0``) or as a Poisson process of ``--rate``
requests per second. Model: the embedded SmolLM2-135M-Instruct (default), a path, or ``tiny`` (a tiny
random Llama with the real tokenizer, for a smoke run).

One engine serves every run; prefix caching is switched on and off between runs (the block manager's
``enable_caching``, what ``enable_prefix_caching`` sets), in alternating order over ``--rounds`` rounds so
that both see the same machine load. Each run uses its own variant of the system prompt (its first words
differ), so a run never reuses the blocks of an earlier one: what is shared is shared within the run, as on
a server where many users hit the same system prompt. Reported per setting (median over rounds): TTFT p50
and p99 (arrival to first token, queueing included), end-to-end time, generated tokens per second, and the
prefix-cache hit rate of the run (cached prompt tokens / prompt tokens looked up).

Run: ``.venv/bin/python benchmarks/prefix_cache_bench.py [--dtype bfloat16] [--threads 2] [--rounds 3]``;
``--quick`` for a smoke run (tiny model, 16 requests, seconds). Results: bench_results/prefix_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from blora.bench.workload import make_bench_adapters, prompts, tiny_model
from blora.engine import SamplingParams
from blora.engine.llm import build_engine

RESULTS = Path("bench_results")
POLICY = (
    "You are the support assistant of a small online bookshop. Answer in a friendly, concise way. You can "
    "help with orders, deliveries, returns, gift cards, accounts and book recommendations. Orders ship "
    "within two working days; delivery takes three to five days inside the country and up to three weeks "
    "abroad. Returns are free within thirty days if the book is unread and in its original condition; the "
    "customer prints a return label from the account page. Gift cards never expire and can be combined "
    "with discounts, but not exchanged for cash. Never ask for a full card number or a password. If a "
    "question is not about the shop, answer briefly and politely steer the conversation back. "
)


def system_prompt(tokenizer, variant: int, target_tokens: int) -> str:
    """About ``target_tokens`` tokens of policy text; ``variant`` changes its first words."""
    text = f"Session {variant}. "
    while len(tokenizer.encode(text)) < target_tokens:
        text += POLICY
    ids = tokenizer.encode(text)[:target_tokens]
    return tokenizer.decode(ids)


def requests(tokenizer, args, variant: int) -> list[tuple[list[int], str]]:
    """(token ids, adapter) of every request of one run."""
    system = system_prompt(tokenizer, variant, args.system_tokens)
    out = []
    for i, question in enumerate(prompts(args.requests, seed=variant)):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append((tokenizer.encode(text, add_special_tokens=False), f"bench-{i % args.adapters}"))
    return out


def run(engine, reqs, args, caching: bool) -> dict:
    """Serve one run's requests; returns its latencies, throughput and hit rate."""
    engine.block_manager.enable_caching = caching
    before = engine.stats()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rng = random.Random(0)
    gaps = [rng.expovariate(args.rate) if args.rate > 0 else 0.0 for _ in reqs]
    start = time.time()
    due = [start + sum(gaps[: i + 1]) for i in range(len(reqs))]
    ttft, tokens, pending = [], 0, 0
    while pending < len(reqs) or engine.has_unfinished_requests():
        now = time.time()
        while pending < len(reqs) and due[pending] <= now:
            ids, adapter = reqs[pending]
            engine.add_request(f"r{pending}", ids, params, adapter, arrival_time=now)
            pending += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(due[pending] - time.time(), 0.05)))
            continue
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                m = out.metrics
                ttft.append(m.first_token_time - m.arrival_time)
                tokens += len(out.outputs[0].token_ids)
    elapsed = time.time() - start
    after = engine.stats()
    queries = after["prefix_cache_queries_total"] - before["prefix_cache_queries_total"]
    hits = after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"]
    ttft.sort()
    return {
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
        "elapsed_s": elapsed,
        "tok_per_s": tokens / elapsed,
        "hit_rate": hits / queries if queries else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF dir, .gguf, or 'tiny' (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rate", type=float, default=0.0, help="requests per second, Poisson (0: all at once)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--adapter-dir", type=Path, default=Path(tempfile.gettempdir()) / "blora-prefix-bench")
    p.add_argument("--out", type=Path, default=RESULTS / "prefix_cache")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 16 requests, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.requests, args.adapters, args.system_tokens = "tiny", 16, 4, 100
        args.max_tokens, args.rounds = 4, 1
    torch.set_num_threads(args.threads)
    model = args.model
    if model == "tiny":
        model = str(tiny_model(args.adapter_dir / "tiny-model"))
    engine = build_engine(
        model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    adapter_root = args.adapter_dir / ("default" if args.model is None else Path(args.model).name or "model")
    for i, path in enumerate(make_bench_adapters(engine.model, adapter_root, args.adapters)):
        engine.load_adapter(f"bench-{i}", path)
    warm = requests(engine.tokenizer, args, variant=-1)[: args.adapters]  # adapters in slots, kernels warm
    run(engine, warm, args, caching=False)
    results: dict[str, list[dict]] = {"on": [], "off": []}
    variant = 0
    for rnd in range(args.rounds):
        for setting in ("on", "off") if rnd % 2 == 0 else ("off", "on"):
            reqs = requests(engine.tokenizer, args, variant)
            variant += 1
            results[setting].append(run(engine, reqs, args, caching=setting == "on"))
            r = results[setting][-1]
            print(
                f"round {rnd} caching {setting}: TTFT p50 {r['ttft_p50_s']:.3f}s, {r['tok_per_s']:.1f} tok/s"
            )
    summary = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    prompt_len = statistics.mean(len(ids) for ids, _ in requests(engine.tokenizer, args, 0))
    table = render(args, summary, prompt_len)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.with_suffix(".json").write_text(
        json.dumps({"config": config, "runs": results, "median": summary}, indent=1)
    )
    args.out.with_suffix(".md").write_text(table + "\n")
    return 0


def render(args, summary: dict, prompt_len: float) -> str:
    on, off = summary["on"], summary["off"]
    lines = [
        f"{args.requests} chat requests over {args.adapters} adapters, a shared system prompt "
        f"(prompts {prompt_len:.0f} tokens on average), {args.max_tokens} new tokens each, "
        f"{'all at once' if args.rate <= 0 else f'{args.rate} req/s'}; {args.dtype}, {args.threads} threads, "
        f"median of {args.rounds} round(s)",
        "",
        "| prefix caching | TTFT p50 (s) | TTFT p99 (s) | total (s) | tok/s | hit rate |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in (("on", on), ("off", off)):
        lines.append(
            f"| {name} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['elapsed_s']:.2f} | "
            f"{r['tok_per_s']:.1f} | {r['hit_rate']:.1%} |"
        )
    lines.append(
        f"| off / on | {off['ttft_p50_s'] / on['ttft_p50_s']:.2f}x | {off['ttft_p99_s'] / on['ttft_p99_s']:.2f}x "
        f"| {off['elapsed_s'] / on['elapsed_s']:.2f}x | {on['tok_per_s'] / off['tok_per_s']:.2f}x (on/off) | |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
