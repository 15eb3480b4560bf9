"""Library-mode throughput: blora ``load_loras`` + ``generate`` vs PEFT mixed batch vs transformers base-only.

Same model (SmolLM2-135M-Instruct), prompts and token counts for every system in one run, per dtype.
Run: ``.venv/bin/python benchmarks/library_bench.py [--dtypes float32 bfloat16] [--runs 3]``. Systems are
timed round-robin; the table reports each system's best round (``--stat best``, the default: other load on
a shared machine only ever slows a run down) or its median (``--stat median``), and ratios between systems.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chat_prompts, make_bench_adapters, median_time  # noqa: E402

from blora import load_loras, prepare_batch  # noqa: E402
from blora.models import load_model  # noqa: E402


def run_dtype(dtype: str, args, adapter_root: Path) -> list[dict]:
    loaded = load_model(dtype=dtype)
    base, tok = loaded.model, loaded.tokenizer
    texts = chat_prompts(tok, args.requests)
    paths = make_bench_adapters(base, adapter_root / dtype, max(args.adapters))
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    n_tokens = args.requests * args.new_tokens
    systems: dict[str, object] = {}
    plain = prepare_batch([(t, None) for t in texts], tok, base, {})
    plain.pop("adapter_ids")
    systems["transformers base-only"] = lambda: base.generate(**plain, **gen)
    model = copy.deepcopy(base)
    model, lora_map = load_loras(model, {p.name: p for p in paths})
    for k in args.adapters:
        names = [paths[i % k].name for i in range(args.requests)]
        batch = prepare_batch(list(zip(texts, names, strict=True)), tok, model, lora_map)
        systems[f"blora library, {k} adapters"] = lambda b=batch: model.generate(**b, **gen)
    if not args.skip_peft:
        from peft import PeftModel

        k = max(args.adapters)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name=paths[0].name)
        for p in paths[1:k]:
            peft_model.load_adapter(str(p), adapter_name=p.name)
        names = [paths[i % k].name for i in range(args.requests)]
        systems[f"PEFT mixed batch, {k} adapters"] = lambda: peft_model.generate(
            **plain, adapter_names=names, **gen
        )
    return _interleaved(dtype, systems, args.runs, n_tokens)


def _interleaved(dtype: str, systems: dict, runs: int, n_tokens: int) -> list[dict]:
    """Warm every system up, then time them round-robin (``runs`` rounds): other load on a shared machine
    then hits every system alike. Reports the median and the best run."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    with torch.inference_mode():
        for fn in systems.values():
            fn()
        for _ in range(runs):
            for name, fn in systems.items():
                times[name].append(median_time(fn, 1)[0])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "dtype": dtype,
                "system": name,
                "tok_s": n_tokens / med,
                "best_tok_s": n_tokens / min(ts),
                "runs_s": ts,
            }
        )
        print(
            f"  {dtype:9s} {name:28s} {n_tokens / med:7.1f} tok/s median, {n_tokens / min(ts):7.1f} best  {ts}",
            flush=True,
        )
    return rows


def report(rows: list[dict], stat: str = "best") -> str:
    lines = ["| dtype | system | tok/s | vs transformers base | vs PEFT mixed |", "|---|---|---:|---:|---:|"]
    key = "best_tok_s" if stat == "best" else "tok_s"
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [{**r, "tok_s": r[key]} for r in rows if r["dtype"] == dtype]
        base = next(r["tok_s"] for r in sub if r["system"].startswith("transformers"))
        peft = next((r["tok_s"] for r in sub if r["system"].startswith("PEFT")), None)
        for r in sub:
            vs_peft = f"{r['tok_s'] / peft:.2f}x" if peft else "-"
            lines.append(
                f"| {dtype} | {r['system']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | {vs_peft} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--stat", choices=["best", "median"], default="best")
    parser.add_argument("--out", type=Path, default=Path("bench_results/library.json"))
    parser.add_argument(
        "--adapter-cache", type=Path, default=Path(tempfile.gettempdir()) / "blora-bench-adapters"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for dtype in args.dtypes for row in run_dtype(dtype, args, args.adapter_cache)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(report(rows, args.stat))


if __name__ == "__main__":
    main()
