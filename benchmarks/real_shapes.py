"""Engine throughput at real model shapes: random weights in the shapes of Qwen2.5-0.5B and Llama-3.2-1B.

The models are built offline from their published configs (written below, vocabularies included: the LM
head is a large share of the work at these sizes), with random weights, and saved once under
``--cache`` (bf16 on disk, loaded in ``--dtype``). Prompts are ``blora bench``'s chat prompts rendered
with the embedded SmolLM2 tokenizer, whose ids all fall inside both vocabularies; the weights being random,
only the shapes matter. 16 PEFT adapters cycle through rank 8 and 16 on all linear layers or on attention
only (``ADAPTER_SHAPES``).

Systems (``blora bench``'s runners, each in its own process: ``blora.bench.systems``): transformers
``generate`` base-only, the blora engine base-only and with 16 distinct adapters, PEFT's mixed batch
(``generate(adapter_names=...)``) with the same 16 adapters. Workload: ``--requests`` (32) requests x
``--new-tokens`` (64) new tokens, greedy, EOS ignored. Each system is timed ``--runs`` times per round
after a warm-up, ``--rounds`` rounds interleaved; tok/s is the median over all its runs. Ratios: engine
with 16 adapters / engine base-only, engine base / transformers, engine with 16 adapters / PEFT mixed.

Memory: the PEFT row of Llama-3.2-1B in float32 holds two copies of the model (~10 GiB); making its
adapters the first time also does. Reproduce (a quiet machine; results in bench_results/real_shapes.*):

    .venv/bin/python benchmarks/real_shapes.py                         # both shapes, default dtype
    .venv/bin/python benchmarks/real_shapes.py --dtype bfloat16 --rounds 3
    .venv/bin/python benchmarks/real_shapes.py --shapes qwen2.5-0.5b --skip-peft
    .venv/bin/python benchmarks/real_shapes.py --skip-peft --no-prefix-caching   # the adapters' own cost
    .venv/bin/python benchmarks/real_shapes.py --quick                 # 2 layers, 8 x 8: a pipeline check
    .venv/bin/python benchmarks/real_shapes.py --alternate 6 --no-prefix-caching  # 16 adapters / base, one process

``--alternate N``: instead of the systems above, one engine in this process runs the workload base-only and
with the adapters alternately, N rounds each (the order flips every round), and prints each round's times
and the median of the per-round ratios: the machine drifts between processes and minutes, not between two
runs in a row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# (rank, alpha, targets), cycled over the adapters: typical fine-tunes of these models.
ADAPTER_SHAPES = [(8, 16, ALL_LINEAR), (16, 32, ATTENTION), (16, 32, ALL_LINEAR), (8, 16, ATTENTION)]

# The published configs (model_type, fields) of the two models; parameter counts 494,032,768 and
# 1,235,814,400 with tied embeddings, as the released checkpoints.
REAL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
            vocab_size=151936, tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768,
            max_window_layers=24,
        ),
    ),
    "llama-3.2-1b": (
        "llama",
        dict(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
            rope_theta=500000.0, vocab_size=128256, tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
}  # fmt: skip

SYSTEMS = ("transformers", "engine", "engine-lora", "peft-mixed")
# (name, numerator system, denominator system, target or None)
RATIOS = [
    ("16 adapters / base", "engine-lora", "engine", 0.92),
    ("engine base / transformers", "engine", "transformers", 1.8),
    ("16 adapters / PEFT mixed", "engine-lora", "peft-mixed", None),
]


@dataclass
class Row:
    """One system at one shape: tok/s is the median over every timed run of every round."""

    shape: str
    system: str
    label: str
    dtype: str
    adapters: int
    requests: int
    new_tokens: int
    runs_s: list[float]
    tok_s: float
    ttft_s: float
    peak_rss_mb: float


def model_config(shape: str, layers: int | None = None, bos: int | None = None, eos: int | None = None):
    """The transformers config of ``shape`` (``layers`` overrides the depth; bos/eos: the tokenizer's)."""
    from transformers import AutoConfig

    model_type, fields = REAL_SHAPES[shape]
    fields = dict(fields, bos_token_id=bos, eos_token_id=eos, pad_token_id=None)
    if layers is not None:
        fields.update(num_hidden_layers=layers)
        if model_type == "qwen2":
            fields.update(max_window_layers=layers)
    return AutoConfig.for_model(model_type, **fields)


def build_model(shape: str, root: Path, layers: int | None = None) -> Path:
    """A random-weight model of ``shape`` with the SmolLM2 tokenizer, saved once under ``root`` (bf16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blora.models import default_model_dir

    path = root / (shape if layers is None else f"{shape}-{layers}layers")
    if (path / "config.json").is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    config = model_config(shape, layers, tokenizer.bos_token_id, tokenizer.eos_token_id)
    print(f"building {path.name}: random weights, saved once (bf16)", flush=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path


def build_adapters(model_dir: Path, dtype: str, count: int) -> Path:
    """``count`` PEFT adapters of ``ADAPTER_SHAPES`` for ``model_dir`` in ``dtype`` (made once)."""
    from blora.bench.workload import make_bench_adapters
    from blora.models import load_model

    directory = model_dir.with_name(model_dir.name + "-adapters") / dtype
    if len(list(directory.glob("bench-*/adapter_model.safetensors"))) < count:
        print(f"making {count} adapters for {model_dir.name} ({dtype})", flush=True)
        make_bench_adapters(load_model(str(model_dir), dtype=dtype).model, directory, count, ADAPTER_SHAPES)
    return directory


def to_row(shape: str, results: list[dict]) -> Row:
    """One ``Row`` from the child results of one system (one per round), tok/s the median run."""
    first = results[0]
    runs = [s for r in results for s in r["runs_s"]]
    return Row(
        shape=shape,
        system=first["system"],
        label=first["label"],
        dtype=first["dtype"],
        adapters=first["adapters"],
        requests=first["requests"],
        new_tokens=first["new_tokens"],
        runs_s=runs,
        tok_s=first["requests"] * first["new_tokens"] / statistics.median(runs),
        ttft_s=statistics.median(r["ttft_s"] for r in results),
        peak_rss_mb=max(r["peak_rss_mb"] for r in results),
    )


def ratios(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per shape, each of ``RATIOS`` whose two systems were measured: {shape: {name: ratio}}."""
    out: dict[str, dict[str, float]] = {}
    for shape in dict.fromkeys(r.shape for r in rows):
        tok = {r.system: r.tok_s for r in rows if r.shape == shape}
        out[shape] = {name: tok[a] / tok[b] for name, a, b, _ in RATIOS if a in tok and b in tok}
    return out


def table(rows: list[Row]) -> str:
    """The Markdown tables: systems per shape, then the ratios against their targets."""
    lines = [
        "| shape | dtype | system | tok/s (median) | TTFT (s) | peak RSS (MiB) | runs |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.dtype} | {r.label} | {r.tok_s:.1f} | {r.ttft_s:.2f} | {r.peak_rss_mb:.0f} "
            f"| {len(r.runs_s)} |"
        )
    lines += ["", "| shape | ratio | value | target |", "|---|---|---:|---:|"]
    targets = {name: target for name, _, _, target in RATIOS}
    for shape, values in ratios(rows).items():
        for name, value in values.items():
            target = targets[name]
            mark = "-" if target is None else f">= {target}x " + ("(met)" if value >= target else "(missed)")
            lines.append(f"| {shape} | {name} | {value:.2f}x | {mark} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=sorted(REAL_SHAPES), default=list(REAL_SHAPES))
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the machine's default)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--adapters", type=int, default=16, help="distinct adapters of the LoRA rows")
    p.add_argument("--runs", type=int, default=3, help="timed runs per system and round")
    p.add_argument("--rounds", type=int, default=1, help="repeat the plan, interleaved")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quicker check)")
    p.add_argument("--skip-peft", action="store_true", help="leave out PEFT mixed")
    p.add_argument(
        "--no-prefix-caching", action="store_true",
        help="the engine without its prefix cache: base rows then share no system-prompt blocks either, so "
        "16 adapters / base is the adapters' own cost",
    )  # fmt: skip
    p.add_argument(
        "--alternate", type=int, default=0, metavar="N",
        help="one engine in this process, base-only and with the adapters alternated N rounds (16 adapters / "
        "base only)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="2 layers, 8 requests x 8 tokens, 1 run")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "blora-real-shapes")
    p.add_argument("--out", type=Path, default=REPO / "bench_results" / "real_shapes", help="OUT.json/.md")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.requests, args.new_tokens, args.runs = args.layers or 2, 8, 8, 1
    return args


def alternate(args: argparse.Namespace, model_dir: Path, adapter_dir: Path) -> None:
    """``--alternate``: base-only and ``args.adapters`` adapters through one ``LLM``, alternated rounds."""
    from blora.bench.systems import workload
    from blora.engine import LLM, SamplingParams
    from blora.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(str(model_dir), dtype=args.dtype, device="cpu")
    paths = sorted(adapter_dir.glob("bench-*"))[: args.adapters]
    llm = LLM(
        loaded, adapters={p.name: str(p) for p in paths}, max_loras=max(16, args.adapters),
        max_num_seqs=max(64, args.requests), enable_prefix_caching=not args.no_prefix_caching,
    )  # fmt: skip
    runs = {0: workload(loaded.tokenizer, SimpleNamespace(requests=args.requests, k=0))}
    runs[args.adapters] = workload(loaded.tokenizer, SimpleNamespace(requests=args.requests, k=args.adapters))
    warm = [p.name for p in paths] + [None]  # adapters load on first use
    llm.generate(["Hi"] * len(warm), SamplingParams(max_tokens=2, temperature=0), adapters=warm)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    seconds: dict[int, list[float]] = {k: [] for k in runs}
    for r in range(args.alternate):
        for k in list(runs)[:: 1 if r % 2 == 0 else -1]:
            if not args.no_prefix_caching:
                llm.engine.reset_prefix_cache()  # every run computes its prompts
            texts, names = runs[k]
            start = time.perf_counter()
            llm.generate(texts, params, adapters=names)
            seconds[k].append(time.perf_counter() - start)
    base, lora = seconds[0], seconds[args.adapters]
    ratio = statistics.median(b / a for b, a in zip(base, lora, strict=True))
    print(f"{model_dir.name}: base-only {[round(x, 2) for x in base]} s, {args.adapters} adapters "
          f"{[round(x, 2) for x in lora]} s; {args.adapters} adapters / base (tok/s, median of the rounds' "
          f"ratios): {ratio:.3f}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from blora.bench.throughput import measure
    from blora.models.device import resolve_device, resolve_dtype

    args = parse_args(argv)
    args.dtype = args.dtype or str(resolve_dtype(None, resolve_device("cpu"))).removeprefix("torch.")
    args.threads = args.threads or torch.get_num_threads()
    harness = SimpleNamespace(
        requests=args.requests, max_tokens=args.new_tokens, threads=args.threads, runs=args.runs,
        no_prefix_caching=args.no_prefix_caching,
    )  # fmt: skip
    plan = [(s, 0 if s in ("transformers", "engine") else args.adapters) for s in SYSTEMS]
    plan = [(s, k) for s, k in plan if not (args.skip_peft and s.startswith("peft"))]
    plan_text = (
        f"one engine, base-only and {args.adapters} adapters alternated, {args.alternate} rounds"
        if args.alternate
        else f"{args.runs} runs x {args.rounds} rounds per system"
    )
    print(
        f"real shapes {', '.join(args.shapes)}: {args.requests} requests x {args.new_tokens} new tokens, "
        f"{args.dtype}, {args.threads} threads, {plan_text}"
        + (", engine without prefix caching" if args.no_prefix_caching else ""),
        flush=True,
    )
    if args.alternate:
        for shape in args.shapes:
            model_dir = build_model(shape, args.cache, args.layers)
            alternate(args, model_dir, build_adapters(model_dir, args.dtype, args.adapters))
        return 0
    rows: list[Row] = []
    failed = 0
    for shape in args.shapes:
        model_dir = build_model(shape, args.cache, args.layers)
        adapter_dir = build_adapters(model_dir, args.dtype, args.adapters)
        results: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for system, k in plan:
                result = measure(system, args.dtype, k, harness, str(model_dir), adapter_dir)
                if result is None:
                    failed += 1
                else:
                    results.setdefault(system, []).append(result)
        rows += [to_row(shape, results[s]) for s, _ in plan if s in results]
    md = table(rows)
    print("\n" + md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"rows": [vars(r) for r in rows], "ratios": ratios(rows), "settings": vars(args)}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    args.out.with_suffix(".md").write_text(md + "\n")
    print(f"\nwrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
