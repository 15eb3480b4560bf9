"""One-command GPU check: CUDA tests, Triton kernel microbenchmarks, engine throughput on a Llama-3-8B-shaped
random-weight model; results as ``results.md`` + ``results.json`` in one folder.

    python benchmarks/gpu_check.py --out gpu_check_out            # one GPU, ~5-8 min on an H200
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke       # CPU, Triton interpreter, tiny model (CI)

Needs torch (CUDA), triton, transformers, peft and blora's own imports (greenlet, gguf, rich; pytest for
the tests stage). Nothing is downloaded: models are built from configs with random weights, adapters are
PEFT adapters with random non-zero weights written to a temporary folder, the tokenizer is synthetic. On a
machine without network, ``--wheels DIR`` installs missing packages from a folder of wheels first.

Stages (``--stages``, default all): ``env`` (versions, GPU, datasheet peaks), ``tests`` (``pytest -m cuda``
in a child process), ``kernels`` (shrink+expand GB/s and TFLOP/s for 1/16/128 adapters at decode and
prefill shapes, against the PyTorch-ops backend and the GPU's peak; paged decode attention), ``engine``
(transformers ``generate`` base-only, PEFT mixed adapters, blora base-only and with 16/128/512 adapters of
rank 16 on all linear layers, 256 requests x 128 new tokens; time to first token; GPU memory). A stage that
fails is recorded with its error and the next one runs. ``--budget-s`` skips stages that would start late.
"""

from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before anything imports triton: the kernels run in Triton's CPU interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Datasheet peaks (dense bf16 tensor FLOP/s, memory bytes/s), matched on the device name; SXM parts.
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}
# import name -> package, for --wheels
NEEDED = {"greenlet": "greenlet", "gguf": "gguf", "rich": "rich", "pytest": "pytest", "triton": "triton"}


@dataclass(frozen=True)
class Sizes:
    """The model and workload of one mode (``FULL``: Llama-3-8B shapes; ``TINY``: the CPU smoke run)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    requests: int
    prompt_len: int
    new_tokens: int
    adapter_counts: tuple[int, ...]
    rank: int
    distinct_files: int  # adapter folders written; names beyond this reuse them (each name its own slot)
    peft_adapters: int
    peft_new_tokens: int
    bench_adapters: tuple[int, ...]
    decode_tokens: int
    prefill_tokens: int
    iters: int


FULL = Sizes(
    4096, 14336, 32, 32, 8, 128256, 256, 128, 128, (16, 128, 512), 16, 16, 16, 32, (1, 16, 128), 256, 4096, 20
)
TINY = Sizes(64, 128, 2, 4, 2, 512, 4, 6, 3, (3,), 4, 2, 2, 2, (1, 4), 8, 40, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for results.md / results.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes (CI)")
    parser.add_argument(
        "--stages", help="comma-separated (default env,tests,kernels,engine; smoke: no tests)"
    )
    parser.add_argument("--budget-s", type=float, default=460.0, help="no stage starts after this")
    parser.add_argument("--wheels", help="pip install missing packages from this folder first (offline)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.wheels:
        install_missing(Path(args.wheels))
    sizes = TINY if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    results: dict = {"mode": "smoke" if args.smoke else "full", "sizes": asdict(sizes), "stages": {}}
    start = time.perf_counter()
    stages = {"env": stage_env, "tests": stage_tests, "kernels": stage_kernels, "engine": stage_engine}
    default = "env,kernels,engine" if args.smoke else "env,tests,kernels,engine"
    for name in (args.stages or default).split(","):
        if time.perf_counter() - start > args.budget_s:
            results["stages"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        t0 = time.perf_counter()
        try:
            results["stages"][name] = stages[name](sizes, device, args.smoke)
        except Exception as exc:  # recorded; the next stage still runs
            results["stages"][name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(),
            }
        results["stages"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        write(out, results)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write(out, results)
    print((out / "results.md").read_text())
    failed = [n for n, s in results["stages"].items() if "error" in s or s.get("failed")]
    return 1 if failed else 0


def install_missing(wheels: Path) -> None:
    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *missing]
        subprocess.run(cmd, check=True)


# -- env -------------------------------------------------------------------------------------------
def peaks(name: str) -> tuple[float | None, float | None]:
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None, None


def stage_env(sizes: Sizes, device: torch.device, smoke: bool) -> dict:
    import transformers

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "missing_modules": [m for m in NEEDED if importlib.util.find_spec(m) is None],
    }
    for mod in ("triton", "peft"):
        spec = importlib.util.find_spec(mod)
        env[mod] = __import__(mod).__version__ if spec else None
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        flops, bw = peaks(prop.name)
        env.update(
            gpu=prop.name,
            gpu_memory_gib=round(prop.total_memory / 2**30, 1),
            sm_count=prop.multi_processor_count,
        )
        env.update(peak_bf16_tflops=flops and flops / 1e12, peak_tb_per_s=bw and bw / 1e12)
    else:
        env.update(gpu=None, note="smoke: CPU tensors, kernels in Triton's interpreter")
    return env


# -- tests -----------------------------------------------------------------------------------------
def stage_tests(sizes: Sizes, device: torch.device, smoke: bool) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {"error": "pytest is not installed (pass --wheels DIR with a pytest wheel)"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real kernels on the GPU
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "tests/test_triton_cuda.py",
        "-p",
        "no:cacheprovider",
    ]
    cmd += ["-o", "addopts=", "-q", "-rfEs"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    counts = {"passed": 0, "failed_tests": 0, "skipped": 0, "errors": 0}
    names = {
        "passed": "passed",
        "failed": "failed_tests",
        "skipped": "skipped",
        "error": "errors",
        "errors": "errors",
    }
    for part in tail[0].replace("=", "").split(","):
        bits = part.split()
        if len(bits) >= 2 and bits[0].isdigit() and bits[1] in names:
            counts[names[bits[1]]] = int(bits[0])
    result = {"returncode": proc.returncode, "summary": tail[0].strip(), **counts}
    result["failed"] = proc.returncode not in (0, 5)
    if result["failed"]:
        result["output_tail"] = (proc.stdout + proc.stderr)[-8000:]
    return result


# -- kernels ---------------------------------------------------------------------------------------
def timed(fn, iters: int, device: torch.device) -> float:
    """Median seconds per call (CUDA events on the GPU, after a warm-up call)."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_shapes(sizes: Sizes) -> dict[str, tuple[int, tuple[int, ...]]]:
    head = sizes.hidden // sizes.heads
    kv = sizes.kv_heads * head
    return {"qkv": (sizes.hidden, (sizes.hidden, kv, kv)), "down": (sizes.intermediate, (sizes.hidden,))}


def stage_kernels(sizes: Sizes, device: torch.device, smoke: bool) -> dict:
    from blora.kernels.triton.lora import add_lora
    from blora.kernels.triton.lora_meta import LoraKernelMeta
    from blora.kernels.triton.lora_weights import LoraWeights
    from blora.lora.backends.torch_ops import TorchBackend
    from blora.lora.plan import LayerLoras, LoraPlan, OutputSlice

    dtype = torch.bfloat16
    flops_peak, bw_peak = peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else (None, None)
    rows = []
    for layer, (in_f, outs) in layer_shapes(sizes).items():
        for n_adapters in sizes.bench_adapters:
            slices = []
            for out in outs:
                sl = {}
                for s in range(n_adapters):
                    a = (torch.randn(sizes.rank, in_f, device=device) * 0.02).to(dtype).t()
                    sl[s] = (a, (torch.randn(sizes.rank, out, device=device) * 0.02).to(dtype))
                slices.append(sl)
            w = LoraWeights(slices, in_f, outs, device, dtype)
            for phase, tokens in (("decode", sizes.decode_tokens), ("prefill", sizes.prefill_tokens)):
                g = torch.Generator().manual_seed(0)
                slots = torch.randint(0, n_adapters, (tokens,), generator=g).tolist()
                x = torch.randn(tokens, in_f, device=device, dtype=dtype)
                y = torch.zeros(tokens, w.total_out, device=device, dtype=dtype)
                meta = LoraKernelMeta.build(slots, device)
                plan = LoraPlan.build(slots, device)
                fused, col = [], 0
                for i, out in enumerate(outs):
                    ids = [s for s in sorted(slices[i]) if s in plan.active]
                    loras = LayerLoras(
                        slots=tuple(ids), positions=tuple(plan.active.index(s) for s in ids),
                        pairs=[slices[i][s] for s in ids], in_features=in_f, out_features=out,
                    )  # fmt: skip
                    fused.append(OutputSlice(loras, col, col + out))
                    col += out
                torch_backend = TorchBackend()
                used = len(set(slots))
                flop = 2 * tokens * sizes.rank * (in_f * len(outs) + w.total_out)
                weight_bytes = used * sizes.rank * (in_f * len(outs) + w.total_out) * 2
                io_bytes = (
                    tokens * in_f * 2 + 2 * tokens * w.total_out * 2 + 2 * tokens * sizes.rank * len(outs) * 4
                )
                total_bytes = weight_bytes + io_bytes
                variants = {"triton_sgmv": functools.partial(add_lora, y, x, w, meta, "sgmv")}
                if phase == "decode":
                    variants["triton_bgmv"] = functools.partial(add_lora, y, x, w, meta, "bgmv")
                variants["torch_ops"] = functools.partial(torch_backend.add_fused, y, x, plan, fused)
                iters = sizes.iters
                for name, fn in variants.items():
                    sec = timed(fn, iters, device)
                    row = {
                        "layer": layer, "adapters": n_adapters, "phase": phase, "tokens": tokens, "impl": name,
                        "us": round(sec * 1e6, 1), "gb_s": round(total_bytes / sec / 1e9, 1),
                        "tflop_s": round(flop / sec / 1e12, 3),
                    }  # fmt: skip
                    if bw_peak:
                        bound = total_bytes / bw_peak
                        row.update(pct_peak_bw=round(100 * total_bytes / sec / bw_peak, 1))
                        row.update(
                            x_bytes_bound=round(sec / bound, 2),
                            pct_peak_flops=round(100 * flop / sec / flops_peak, 2),
                        )
                    rows.append(row)
    return {"lora": rows, "attention": bench_attention(sizes, device, bw_peak)}


def bench_attention(sizes: Sizes, device: torch.device, bw_peak: float | None) -> list[dict]:
    from blora.engine.attention import AttentionMetadata, _decode_torch
    from blora.kernels.triton.attention import paged_decode_attention

    dtype, head = torch.bfloat16, sizes.hidden // sizes.heads
    rows = []
    for batch, ctx in (
        (sizes.requests, sizes.prompt_len + sizes.new_tokens),
        (max(1, sizes.requests // 8), 8 * (sizes.prompt_len + sizes.new_tokens)),
    ):
        n_slots = batch * ctx
        k = torch.randn(sizes.kv_heads, n_slots + 1, head, device=device, dtype=dtype)
        v = torch.randn_like(k)
        slots = torch.randperm(n_slots, device=device).view(batch, ctx)
        lens = torch.full((batch,), ctx, device=device)
        q = torch.randn(1, sizes.heads, batch, head, device=device, dtype=dtype)
        rows_t = torch.arange(batch, device=device)
        meta = AttentionMetadata(num_tokens=batch, slot_mapping=rows_t, decode_rows=rows_t, decode_slots=slots,
                                 decode_context_lens=lens, all_decode=True)  # fmt: skip
        kv_bytes = 2 * batch * ctx * sizes.kv_heads * head * 2
        for name, fn in (
            (
                "triton",
                functools.partial(paged_decode_attention, q[0], rows_t, k, v, slots, lens, head**-0.5),
            ),
            ("torch_gather_bmm", functools.partial(_decode_torch, q, k, v, meta, head**-0.5, None)),
        ):
            sec = timed(fn, sizes.iters, device)
            row = {
                "batch": batch,
                "context": ctx,
                "impl": name,
                "us": round(sec * 1e6, 1),
                "gb_s": round(kv_bytes / sec / 1e9, 1),
            }
            if bw_peak:
                row["pct_peak_bw"] = round(100 * kv_bytes / sec / bw_peak, 1)
            rows.append(row)
    return rows


# -- engine ----------------------------------------------------------------------------------------
def synthetic_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(vocab_size)}, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<t0>", bos_token="<t1>", eos_token="<t2>", pad_token="<t0>"
    )


def build_model(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
        max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def write_adapters(model, sizes: Sizes, root: Path) -> list[Path]:
    """``distinct_files`` PEFT adapters (rank ``sizes.rank``, all linear layers, random non-zero A and B)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=sizes.rank, lora_alpha=2 * sizes.rank, target_modules="all-linear")
    peft = get_peft_model(model, cfg, autocast_adapter_dtype=False)  # adapters saved in the model's dtype
    dirs = []
    for i in range(sizes.distinct_files):
        g = torch.Generator(device=next(model.parameters()).device).manual_seed(i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * 0.01)
        dirs.append(root / f"adapter{i}")
        peft.save_pretrained(dirs[-1])
    peft.unload()  # the base model, without the LoRA layers
    return dirs


def gpu_memory(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_hf(model, prompts, new_tokens: int, device: torch.device, adapter_names=None) -> dict:
    ids = torch.tensor(prompts, device=device)
    kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs,
        )  # fmt: skip
    sync(device)
    sec = time.perf_counter() - t0
    generated = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {
        "requests": len(prompts),
        "new_tokens": new_tokens,
        "seconds": round(sec, 2),
        "tok_s": round(generated / sec, 1),
    }


def run_engine(engine, prompts, adapters, new_tokens: int, device: torch.device) -> dict:
    from blora.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", prompt, params, adapter)
    first: dict[str, float] = {}
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id not in first and out.outputs[0].token_ids:
                first[out.request_id] = time.perf_counter() - t0
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
    sync(device)
    sec = time.perf_counter() - t0
    ttft = sorted(first.values())
    return {
        "requests": len(prompts), "distinct_adapters": len({a for a in adapters if a}), "seconds": round(sec, 2),
        "tok_s": round(tokens / sec, 1), "ttft_median_s": round(ttft[len(ttft) // 2], 3),
        "ttft_p90_s": round(ttft[int(len(ttft) * 0.9)], 3), "gpu_peak_gib": gpu_memory(device),
    }  # fmt: skip


def stage_engine(sizes: Sizes, device: torch.device, smoke: bool) -> dict:
    from peft import PeftModel

    from blora.engine.llm import build_engine

    dtype = torch.float32 if smoke else torch.bfloat16
    model = build_model(sizes, device, dtype)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, sizes.vocab, (sizes.requests, sizes.prompt_len), generator=g).tolist()
    runs: dict[str, dict] = {}
    runs["transformers_generate_base"] = run_hf(model, prompts, sizes.new_tokens, device)
    tmp = Path(tempfile.mkdtemp(prefix="blora-gpu-check-"))
    dirs = write_adapters(model, sizes, tmp)
    peft = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, sizes.peft_adapters):
        peft.load_adapter(str(dirs[i % len(dirs)]), adapter_name=f"a{i}", autocast_adapter_dtype=False)
    names = [f"a{i % sizes.peft_adapters}" for i in range(sizes.requests)]
    runs[f"peft_mixed_{sizes.peft_adapters}"] = run_hf(peft, prompts, sizes.peft_new_tokens, device, names)
    model = peft.unload()
    del peft
    if device.type == "cuda":
        torch.cuda.empty_cache()
    max_len = sizes.prompt_len + sizes.new_tokens + 16
    engine = build_engine(
        model, tokenizer=synthetic_tokenizer(sizes.vocab), max_loras=max(sizes.adapter_counts),
        max_num_seqs=sizes.requests, max_num_batched_tokens=max(64, 32 * sizes.prompt_len), block_size=16,
        max_model_len=max_len, num_kv_blocks=sizes.requests * (max_len // 16 + 1), cpu_cache_bytes=32 << 30,
        enable_prefix_caching=False, lora_backend="triton",
    )  # fmt: skip
    result = {
        "backend": engine.runner.backend.name,
        "attention": engine.runner.attention_backend,
        "runs": runs,
    }
    runs["blora_base"] = run_engine(engine, prompts, [None] * sizes.requests, sizes.new_tokens, device)
    for n in sizes.adapter_counts:
        names = [f"n{n}-{i}" for i in range(n)]
        for i, name in enumerate(names):
            engine.register_adapter(name, dirs[i % len(dirs)])
        t0 = time.perf_counter()  # load every adapter once (one short request each), not timed below
        run_engine(engine, [prompts[0][:4]] * n, names, 1, device)
        adapters = [names[i % n] for i in range(sizes.requests)]
        run = run_engine(engine, prompts, adapters, sizes.new_tokens, device)
        run["adapters_registered"] = n
        run["load_seconds"] = round(time.perf_counter() - t0 - run["seconds"], 1)
        run["vs_blora_base"] = round(run["tok_s"] / runs["blora_base"]["tok_s"], 3)
        runs[f"blora_{n}_adapters"] = run
    base = runs["blora_base"]["tok_s"]
    result["blora_base_vs_generate"] = round(base / runs["transformers_generate_base"]["tok_s"], 2)
    return result


# -- report ----------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = [f"# blora GPU check ({results['mode']})", ""]
    if results["mode"] == "smoke":
        md += [
            "Smoke run: CPU tensors, kernels in Triton's interpreter, tiny model. The timings mean nothing.",
            "",
        ]
    for name, stage in results["stages"].items():
        md += [f"## {name} ({stage.get('seconds', '?')} s)", ""]
        if "error" in stage or "skipped" in stage:
            md += ["```", str(stage.get("error") or stage.get("skipped")), "```", ""]
        if name == "env" or name == "tests":
            md += [table([{k: v for k, v in stage.items() if k not in ("trace", "output_tail")}]), ""]
            if stage.get("output_tail"):
                md += ["```", stage["output_tail"][-3000:], "```", ""]
        elif name == "kernels" and "lora" in stage:
            md += ["LoRA shrink+expand, bf16, rank 16:", "", table(stage["lora"]), ""]
            md += ["Paged decode attention, bf16:", "", table(stage["attention"]), ""]
        elif name == "engine" and "runs" in stage:
            md += [f"LoRA backend: {stage['backend']}; attention: {stage['attention']}; "
                   f"blora base-only / transformers generate: {stage.get('blora_base_vs_generate')}", ""]  # fmt: skip
            md += [table([{"run": k, **v} for k, v in stage["runs"].items()]), ""]
    (out / "results.md").write_text("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
