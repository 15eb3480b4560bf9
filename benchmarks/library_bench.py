"""Library-mode throughput: blora ``load_loras`` + ``generate`` vs transformers base-only (and PEFT mixed).

Same model (the embedded SmolLM2-135M-Instruct), prompts and number of generated tokens for every system,
per dtype and batch size. Default workload (``--workload demo``): the four demo adapters and the base model
mixed in one batch, row ``i`` using ``[base, caps, json, brief, pirate][i % 5]``; ``--workload bench``: the
16 benchmark adapters of ranks 8-64 (``benchmarks/common.py``), ``--adapters K`` distinct ones round-robin.
transformers runs the same rows base-only (it has no adapters): the ratio is what the LoRAs cost.

Run: ``.venv/bin/python benchmarks/library_bench.py [--rows 5 32] [--dtypes bfloat16 float32] [--runs 5]``.
After a warm-up, systems are timed in alternation (A B, then B A, ...) so drifting load on a shared machine
hits both alike; the table reports median tok/s and the median of the per-round ratios to transformers.
``--decode-steps`` times single decode steps instead (KV cache, one token per row): more rounds in the same
time on a busy machine. Library mode loads with prepacked base weights (``load_loras`` default);
``--no-packed`` times it with ``packed_weights=False`` instead, ``--both-packed`` both in the same rounds.
``--cpu-time`` reports CPU time instead of wall time (see its help).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chat_prompts, make_bench_adapters  # noqa: E402

from blora import load_loras, prepare_batch  # noqa: E402
from blora.demo.behaviours import ADAPTER_NAMES, adapter_path  # noqa: E402
from blora.models import load_model  # noqa: E402

BASELINE = "transformers base-only"


def adapter_sets(args, base, dtype: str) -> dict[str, tuple[dict[str, Path], list[str | None]]]:
    """label -> (adapters to load, per-row adapter cycle) for the chosen workload."""
    if args.workload == "demo":
        return {
            "demo 4 adapters + base": ({n: adapter_path(n) for n in ADAPTER_NAMES}, [None, *ADAPTER_NAMES])
        }
    paths = make_bench_adapters(base, args.adapter_cache / dtype, max(args.adapters))
    return {
        f"{k} bench adapters": ({p.name: p for p in paths}, [p.name for p in paths[:k]])
        for k in args.adapters
    }


def systems_for(args, dtype: str, rows: int, loaded) -> dict[str, Callable[[], object]]:
    base, tok = loaded
    texts = chat_prompts(tok, rows)
    gen = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=tok.eos_token_id,
    )
    plain = prepare_batch([(t, None) for t in texts], tok, base, {})
    plain.pop("adapter_ids")
    systems: dict[str, Callable[[], object]] = {BASELINE: lambda: base.generate(**plain, **gen)}
    models = {packed: copy.deepcopy(base) for packed in packed_modes(args)}
    maps: dict[bool, dict[str, int]] = {packed: {} for packed in models}
    for label, (adapters, cycle) in adapter_sets(args, base, dtype).items():
        names = [cycle[i % len(cycle)] for i in range(rows)]
        for packed in models:
            # the sets of one workload share adapters: each model loads every one once
            new = {name: path for name, path in adapters.items() if name not in maps[packed]}
            model, lora_map = load_loras(models[packed], new, packed_weights=packed)
            maps[packed] = lora_map
            batch = prepare_batch(list(zip(texts, names, strict=True)), tok, model, lora_map)
            name = f"blora library, {label}{'' if packed else ' (not packed)'}"
            systems[name] = lambda b=batch, m=model: m.generate(**b, **gen)
        if args.peft:
            systems[f"PEFT mixed batch, {label}"] = _peft_system(base, adapters, names, plain, gen)
    return systems


def packed_modes(args) -> list[bool]:
    """The ``load_loras(packed_weights=...)`` settings to time: ``--no-packed`` off only, ``--both-packed``
    both in the same rounds (their ratio is what the prepacked base weights bring)."""
    if args.both_packed:
        return [True, False]
    return [not args.no_packed]


def _peft_system(base, adapters: dict[str, Path], names: list[str | None], plain: dict, gen: dict):
    from peft import PeftModel

    items = list(adapters.items())
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(items[0][1]), adapter_name=items[0][0])
    for name, path in items[1:]:
        peft_model.load_adapter(str(path), adapter_name=name)
    peft_names = ["__base__" if n is None else n for n in names]
    return lambda: peft_model.generate(**plain, adapter_names=peft_names, **gen)


def alternate(
    systems: dict[str, Callable[[], object]], runs: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Warm every system up, then ``runs`` rounds, each round in the reverse order of the previous one."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    order = list(systems)
    # no_grad, as ``generate`` runs itself; not inference_mode, whose tensors have no version counter, which
    # library mode's shared q/k/v (gate/up) results need (``blora.lora.layers.SharedInput``)
    with torch.no_grad():
        for fn in systems.values():
            fn()
        for _ in range(runs):
            for name in order:
                start = clock()
                systems[name]()
                times[name].append(clock() - start)
            order.reverse()
    return times


def decode_systems(args, dtype: str, rows: int, loaded) -> dict[str, Callable[[], object]]:
    """One decode step each (KV cache, one new token per row), for ``--decode-steps``: less time per round
    than a whole ``generate``, so more rounds fit a busy machine. Demo workload only."""
    base, tok = loaded
    texts = chat_prompts(tok, rows)
    cycle = [None, *ADAPTER_NAMES]
    systems: dict[str, Callable[[], object]] = {}
    for packed in packed_modes(args):
        model, lora_map = load_loras(
            copy.deepcopy(base), {n: adapter_path(n) for n in ADAPTER_NAMES}, packed_weights=packed
        )
        batch = prepare_batch([(t, cycle[i % len(cycle)]) for i, t in enumerate(texts)], tok, model, lora_map)
        name = f"blora library, demo 4 adapters + base (decode step{'' if packed else ', not packed'})"
        systems[name] = _stepper(model, batch)
    return {
        BASELINE: _stepper(base, prepare_batch([(t, None) for t in texts], tok, base, {}), lora=False)
    } | systems


def _stepper(m, batch: dict[str, torch.Tensor], lora: bool = True) -> Callable[[], object]:
    """One decode step of ``m`` on ``batch`` (after its prefill), each call one more token per row."""
    ids, mask, slots = batch["input_ids"], batch["attention_mask"], batch["adapter_ids"]

    extra = {"adapter_ids": slots} if lora else {}
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, use_cache=True, **extra)
    state = [out.past_key_values, out.logits[:, -1:].argmax(-1), mask]

    def step() -> None:
        past, nxt, msk = state
        msk = torch.cat([msk, msk.new_ones(msk.shape[0], 1)], 1)
        out = m(input_ids=nxt, attention_mask=msk, past_key_values=past, use_cache=True, **extra)
        state[1:] = [out.logits[:, -1:].argmax(-1), msk]

    return step


def measure(args, dtype: str, rows: int, loaded) -> list[dict]:
    build = decode_systems if args.decode_steps else systems_for
    times = alternate(
        build(args, dtype, rows, loaded), args.runs, time.process_time if args.cpu_time else time.perf_counter
    )
    n_tokens = rows * (1 if args.decode_steps else args.new_tokens)
    base = times[BASELINE]
    out = []
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts, strict=True)]  # per round: tok/s relative to transformers
        row = {
            "dtype": dtype,
            "rows": rows,
            "system": name,
            "tok_s": n_tokens / statistics.median(ts),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "runs_s": ts,
        }
        out.append(row)
        print(
            f"  {dtype:9s} rows={rows:3d} {name:44s} {row['tok_s']:7.1f} tok/s  "
            f"{row['ratio']:.3f}x  rounds {' '.join(f'{r:.3f}' for r in ratios)}",
            flush=True,
        )
    return out


def report(rows: list[dict]) -> str:
    lines = [
        "| dtype | rows | system | tok/s (median) | vs transformers base-only |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['rows']} | {r['system']} | {r['tok_s']:.1f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--rows", type=int, nargs="+", default=[5, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--workload", choices=["demo", "bench"], default="demo")
    parser.add_argument("--adapters", type=int, nargs="+", default=[4, 16], help="with --workload bench")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-steps", action="store_true", help="time single decode steps, not generate")
    parser.add_argument("--peft", action="store_true", help="also time PEFT (one batch with adapter_names)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the process's CPU time, not wall time: steadier on a machine other jobs load (with "
        "--threads 1; with more threads it counts OpenMP's spin-waiting too)",
    )
    packing = parser.add_mutually_exclusive_group()
    packing.add_argument(
        "--no-packed", action="store_true", help="library mode with load_loras(packed_weights=False)"
    )
    packing.add_argument(
        "--both-packed", action="store_true", help="library mode with and without packed weights, alternated"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results/library.json"))
    parser.add_argument(
        "--adapter-cache", type=Path, default=Path(tempfile.gettempdir()) / "blora-bench-adapters"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for dtype in args.dtypes:
        loaded = load_model(dtype=dtype)
        for rows in args.rows:
            results += measure(args, dtype, rows, (loaded.model, loaded.tokenizer))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
