"""Adapter store at scale: 1,000 registered SmolLM2 adapters, power-law popularity, ~64 distinct in flight.

Workload (issue 4): SmolLM2-135M-Instruct; 1,000 PEFT adapters (ranks 8-16, target sets all-linear /
attention / MLP / q+v; PEFT's adapter_config.json and key layout, random tensors, bf16 files) under one
``adapter_root``, scanned lazily; ``--requests`` chat requests whose adapters follow a power law (Zipf
exponent ``--alpha`` over a shuffled ranking, S-LoRA style), all submitted at once; ``--new-tokens`` tokens
each (EOS ignored); ``max_loras`` 64 slots; ``max_num_seqs`` 64 (or more: then the 64-adapter cap binds).

Serving (one subprocess): one engine alternates ``--runs`` runs with adapters and base-only runs on the
same prompts (this machine's load changes over minutes, so the pairs are interleaved). Run 0 with adapters
starts cold (nothing loaded: every adapter comes from disk on first use, prefetched in the background while
the batch runs); later runs draw new requests from the same popularity. A separate base-only subprocess
gives the base peak RSS. Reported: generated tok/s and the ratio to base-only, adapter hit rates (tier at
arrival, slot hits), requests held back while their adapter loaded, loads and evictions, distinct adapters
per step, CPU cache peak against its budget, resident adapter memory, peak RSS, and the time the running
batch spent installing adapters.

Cold load (disk -> usable) is measured separately on ``--cold`` rank-16 all-linear adapters whose files
were evicted from the page cache (``posix_fadvise(DONTNEED)``): read + validate + prepare, then install
into a slot; p50/p99. Registration cost: time and RSS for 1,000 ``register_adapter`` calls and one root scan.

Run: ``.venv/bin/python benchmarks/scale_bench.py [--dtype bfloat16|float32] [--threads N]`` (``--quick``
for a smoke run). Adapters are generated once into ``--adapter-dir`` (4 GB). Results:
bench_results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chat_prompts  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_SETS = {"all": ALL, "attn": ALL[:4], "mlp": ALL[4:], "qv": ["q_proj", "v_proj"]}
RESULTS = Path("bench_results")


# -- adapters ---------------------------------------------------------------------------------------


def peft_template(model, targets: list[str]) -> tuple[dict, dict[str, tuple[int, int]]]:
    """adapter_config.json and {module key prefix: (in, out)} of a real PEFT adapter for ``targets``."""
    import copy
    import tempfile

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        config = json.loads((Path(tmp) / "adapter_config.json").read_text())
        tensors = load_file(str(Path(tmp) / "adapter_model.safetensors"))
    shapes = {}
    for key, t in tensors.items():
        prefix = key.rsplit(".lora_", 1)[0]
        in_f, out_f = shapes.get(prefix, (None, None))
        shapes[prefix] = (t.shape[1], out_f) if ".lora_A." in key else (in_f, t.shape[0])
    return config, shapes


def write_adapter(
    path: Path, config: dict, shapes: dict, r: int, pool: torch.Tensor, rng: random.Random
) -> None:
    """One adapter in PEFT's format: ``config`` with rank ``r``, random A/B cut from ``pool`` (bf16)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, (in_f, out_f) in shapes.items():
        for kind, shape, std in (("A", (r, in_f), in_f**-0.5), ("B", (out_f, r), 0.02)):
            n = shape[0] * shape[1]
            start = rng.randrange(0, pool.numel() - n)
            tensors[f"{prefix}.lora_{kind}.weight"] = (pool[start : start + n] * std).view(shape).clone()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": r, "lora_alpha": 2 * r}))


def make_adapters(root: Path, count: int, cold: int) -> None:
    """``count`` adapters u0000.. (ranks 8-16, mixed target sets) + ``cold`` rank-16 all-linear ones."""
    marker = root / f".complete-{count}-{cold}"
    if marker.is_file():
        return
    from blora.models import load_model

    model = load_model(None, dtype="bfloat16").model
    templates = {name: peft_template(model, targets) for name, targets in TARGET_SETS.items()}
    rng = random.Random(0)
    pool = torch.randn(8 << 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    t0 = time.time()
    for i in range(count):
        kind, r = rng.choice(list(TARGET_SETS)), rng.randint(8, 16)
        path = root / "pool" / f"u{i:04d}"
        if not (path / "adapter_config.json").is_file():
            write_adapter(path, *templates[kind], r, pool, rng)
    for i in range(cold):
        path = root / "cold" / f"c{i:03d}"
        if not (path / "adapter_config.json").is_file():
            write_adapter(path, *templates["all"], 16, pool, rng)
    marker.write_text(f"{time.time() - t0:.1f} s\n")


def drop_page_cache(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


# -- measurements (child processes) -----------------------------------------------------------------


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trace(n: int, num_adapters: int, alpha: float, seed: int = 0) -> list[str]:
    """Adapter names of ``n`` requests, popularity ~ 1 / rank**alpha over a fixed shuffled ranking
    (the same popular adapters in every run; ``seed`` draws the requests)."""
    ranking = [f"u{i:04d}" for i in range(num_adapters)]
    random.Random(12345).shuffle(ranking)
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** alpha for k in range(num_adapters)]
    return rng.choices(ranking, weights=weights, k=n)


def run_system(args) -> dict:
    """Base-only and adapter runs interleaved in one engine (the machine's load changes over minutes):
    run 0 with adapters starts cold; later runs use new traces over the same 1,000 adapters."""
    from blora.engine import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    root = Path(args.adapter_dir)
    llm = LLM(
        None,
        dtype=args.dtype,
        adapter_root=str(root / "pool"),
        max_loras=args.max_loras,
        max_num_seqs=args.max_num_seqs,
        cpu_cache_bytes=int(args.cpu_cache_mb * 2**20),
    )
    engine = llm.engine
    texts = chat_prompts(llm.tokenizer, args.requests, seed=1)
    llm.generate(
        ["Hi"], SamplingParams(max_tokens=2, temperature=0)
    )  # warm-up (base only: adapters stay cold)
    per_step: list[tuple[int, int]] = []
    schedule = engine.scheduler.schedule

    def spy():
        plan = schedule()
        per_step.append((len(plan.adapters), plan.num_tokens))
        return plan

    engine.scheduler.schedule = spy
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    def timed(names) -> float:
        start = time.time()
        outs = llm.generate(texts, params, adapters=names)
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
        return args.requests * args.new_tokens / (time.time() - start)

    runs, cold_store, distinct = [], None, []
    for i in range(args.runs if args.system == "serve" else 1):
        names = trace(args.requests, args.num_adapters, args.alpha, seed=i)
        distinct.append(len(set(names)))
        per_step.clear()
        lora = timed(names) if args.system == "serve" else None
        busy = [a for a, n in per_step if n]
        if cold_store is None:
            cold_store = engine.adapter_stats()
        runs.append({"lora_tok_s": lora, "base_tok_s": timed([None] * len(texts)), "adapters_per_step": busy})
    steps = [a for r in runs[1:] or runs for a in r["adapters_per_step"]]
    for r in runs:
        del r["adapters_per_step"]
    return {
        "system": args.system,
        "runs": runs,
        "distinct_requested": distinct,
        "adapters_per_step_mean": sum(steps) / max(1, len(steps)),
        "adapters_per_step_max": max(steps, default=0),
        "peak_rss_mb": peak_rss_mb(),
        "store_cold": cold_store,
        "store": engine.adapter_stats(),
    }


def run_cold(args) -> dict:
    """Disk -> usable for rank-16 all-linear adapters with their files out of the page cache."""
    from blora.engine import LLM

    torch.set_num_threads(args.threads)
    llm = LLM(None, dtype=args.dtype, max_loras=4)
    store = llm.engine.store
    dirs = sorted((Path(args.adapter_dir) / "cold").iterdir())[: args.cold]
    read, install, total = [], [], []
    for i, d in enumerate(dirs):
        drop_page_cache(d)
        t0 = time.perf_counter()
        prepared = store.manager.prepare(d.name, str(d), device="cpu")
        t1 = time.perf_counter()
        store.manager.install(prepared)
        t2 = time.perf_counter()
        store.manager.unload(d.name)
        if i:  # the first one pays one-off costs (imports, allocator warm-up)
            read.append(t1 - t0)
            install.append(t2 - t1)
            total.append(t2 - t0)
    mb = prepared.nbytes / 2**20
    reg = registration_cost(Path(args.adapter_dir) / "pool")
    return {"adapter_mb": mb, "read_ms": pct(read), "install_ms": pct(install), "total_ms": pct(total), **reg}


def registration_cost(pool: Path) -> dict:
    from blora.lora.manager import LoraManager
    from blora.lora.store import AdapterStore, StoreConfig

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    store = AdapterStore(LoraManager(model), StoreConfig())
    before = rss_mb()
    t0 = time.perf_counter()
    for d in sorted(pool.iterdir()):
        store.register(d.name, str(d))
    t_reg = time.perf_counter() - t0
    after = rss_mb()
    rooted = AdapterStore(LoraManager(model), StoreConfig(roots=(pool,)))
    t0 = time.perf_counter()
    listed = len(rooted.list())
    t_scan = time.perf_counter() - t0
    return {
        "register_1000_ms": 1000 * t_reg,
        "register_1000_rss_mb": after - before,
        "root_scan_ms": 1000 * t_scan,
        "root_listed": listed,
    }


def pct(values: list[float]) -> dict:
    data = sorted(values)
    if not data:
        return {}
    return {
        "p50": 1000 * data[len(data) // 2],
        "p99": 1000 * data[min(len(data) - 1, int(0.99 * len(data)))],
        "n": len(data),
    }


# -- orchestration -----------------------------------------------------------------------------------


def child(args, system: str) -> dict:
    cmd = [sys.executable, __file__, "--child", system] + [a for a in sys.argv[1:] if a != "--quick"]
    if args.quick:
        cmd += [
            "--requests",
            str(args.requests),
            "--new-tokens",
            str(args.new_tokens),
            "--cold",
            str(args.cold),
        ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, base: dict, serve: dict, cold: dict) -> str:
    s, c = serve["store"], serve["store_cold"]
    arrivals = c["arrivals"]
    total = sum(arrivals.values()) or 1
    runs = serve["runs"]
    cold_ratio = runs[0]["lora_tok_s"] / runs[0]["base_tok_s"]
    warm = runs[1:] or runs
    best_lora = max(r["lora_tok_s"] for r in warm)
    best_base = max(r["base_tok_s"] for r in runs)
    pairs = " / ".join(f"{r['lora_tok_s']:.0f} vs {r['base_tok_s']:.0f}" for r in runs)
    lines = [
        f"SmolLM2-135M-Instruct, {args.dtype}, {args.threads} thread(s); {args.num_adapters} adapters registered "
        f"(ranks 8-16) under one root; {args.requests} requests x {args.new_tokens} new tokens per run, Zipf "
        f"alpha {args.alpha} ({serve['distinct_requested'][0]} distinct adapters in the first trace); "
        f"max_loras {args.max_loras}, max_num_seqs {args.max_num_seqs}; CPU cache budget {args.cpu_cache_mb:.0f} MiB.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| throughput, adapters vs base-only, run by run (tok/s) | {pairs} | |",
        f"| run 0: cold start (every adapter from disk) | **{cold_ratio:.2f}x** base-only | |",
        f"| later runs: best with adapters / best base-only | {best_lora:.0f} / {best_base:.0f} tok/s = "
        f"**{best_lora / best_base:.2f}x** | >= 0.7x |",
        f"| distinct adapters per step (later runs) | mean {serve['adapters_per_step_mean']:.1f}, max "
        f"{serve['adapters_per_step_max']} | ~64 |",
        f"| cold load, rank-16 all-linear ({cold['adapter_mb']:.1f} MiB): read+validate+prepare | p50 "
        f"{cold['read_ms']['p50']:.1f} ms, p99 {cold['read_ms']['p99']:.1f} ms | |",
        f"| cold load: install into a slot | p50 {cold['install_ms']['p50']:.2f} ms, p99 "
        f"{cold['install_ms']['p99']:.2f} ms | |",
        f"| **cold load, disk -> usable** | **p50 {cold['total_ms']['p50']:.1f} ms**, p99 "
        f"{cold['total_ms']['p99']:.1f} ms | p50 <= 50 ms |",
        f"| run 0: loads in the background thread | {c['loads']}: p50 {c['load_ms'].get('p50', 0):.1f} ms, "
        f"p99 {c['load_ms'].get('p99', 0):.1f} ms | |",
        f"| all runs: loads / cache evictions / slot evictions | {s['loads']} / {s['cache_evictions']} / "
        f"{s['slot_evictions']} | |",
        f"| tier at request arrival, run 0 | slot {arrivals.get('slot', 0) / total:.0%}, CPU cache "
        f"{arrivals.get('cache', 0) / total:.0%}, disk {arrivals.get('disk', 0) / total:.0%} | |",
        f"| tier at request arrival, all runs | {_tiers(s['arrivals'])} | |",
        f"| requests held back while their adapter loaded (background), run 0 / all runs | "
        f"{c['requests_waited_for_load']} / {s['requests_waited_for_load']} of "
        f"{args.requests * len(runs)} | |",
        f"| slot activations, all runs | {s['activations'].get('slot_hit', 0)} hits, "
        f"{s['activations'].get('install', 0)} installs (install p50 {s['install_ms'].get('p50', 0):.2f} ms, "
        f"p99 {s['install_ms'].get('p99', 0):.2f} ms) | |",
        f"| run 0: time the running batch spent installing adapters | {c['install_total_ms']:.0f} ms | |",
        f"| CPU cache peak | {s['cache_peak_bytes'] / 2**20:.0f} MiB of {s['cache_budget_bytes'] / 2**20:.0f} "
        f"MiB | within budget |",
        f"| adapter memory at the end: cache + slots (resident) | {s['resident_bytes'] / 2**20:.0f} MiB "
        f"({s['slot_bytes'] / 2**20:.0f} MiB in {len(s['active'])} slots) | |",
        f"| peak RSS | base-only process {base['peak_rss_mb']:.0f} MiB, serving process "
        f"{serve['peak_rss_mb']:.0f} MiB | |",
        f"| 1,000 registrations | {cold['register_1000_ms']:.1f} ms, {cold['register_1000_rss_mb']:+.1f} MiB RSS;"
        f" root scan of {cold['root_listed']}: {cold['root_scan_ms']:.0f} ms | ~free |",
    ]
    return "\n".join(lines)


def _tiers(arrivals: dict) -> str:
    total = sum(arrivals.values()) or 1
    return ", ".join(f"{k} {arrivals.get(k, 0) / total:.0%}" for k in ("slot", "cache", "disk"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter-dir", default="/tmp/blora-scale-adapters")
    p.add_argument("--num-adapters", type=int, default=1000)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--max-loras", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--cpu-cache-mb", type=float, default=512)
    p.add_argument("--cold", type=int, default=30)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=3, help="interleaved adapter/base-only run pairs")
    p.add_argument("--child", choices=["base", "serve", "cold"])
    args = p.parse_args()
    if args.child:
        args.system = args.child
        result = run_cold(args) if args.child == "cold" else run_system(args)
        print(json.dumps(result))
        return
    if args.quick:
        args.requests, args.new_tokens, args.cold, args.runs = 64, 8, 6, 2
    make_adapters(Path(args.adapter_dir), args.num_adapters, args.cold)
    cold = child(args, "cold")
    base = child(args, "base")
    lora = child(args, "serve")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps({"base": base, "serve": lora, "cold": cold}, indent=2))
    table = report(args, base, lora, cold)
    (RESULTS / "scale.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
