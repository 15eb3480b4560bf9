"""Quantized base models: engine tok/s and weight memory of int8 / int4 against float32 and bfloat16.

``engine`` (default): the embedded SmolLM2-135M-Instruct (or ``--model``) in four variants, float32,
bfloat16, int8 and int4 (the quantized ones quantize the bfloat16 model, the default dtype on a CPU with
native bfloat16; ``--quant-dtype float32`` quantizes the float32 one), each an ``LLM`` built once; ``--requests 1 4 32`` concurrent greedy requests of ``--new-tokens`` tokens (1: memory
bound decode, 32: compute bound), half of them on a LoRA adapter (rank 16 on every linear, ``--no-adapters``
for base only). After a warm-up the variants run in alternation, ``--rounds`` times, so drifting load on a
shared machine hits all alike; the table gives the median tok/s, the median of the per-round ratios to
bfloat16 and to float32, the bytes of the decoder layers' weights and of the whole model (each tensor's
storage once: a tied head and embedding count once; the fast path's prepacked copies not included). ``--fast-path off`` runs every variant on
transformers' modules instead of the model family's own forward (``LLM(fast_path=...)``); ``--fast-path
both`` adds each quantized variant a second time on transformers' modules ("int8:off") and gives the ratio
of the two; ``--variants`` picks some of the four.

``ops``: the kernels alone at the model's shapes (q/o 576x576, k/v 576x192, gate/up 576x1536, down
1536x576; ``--head``: the LM head, 576x49152), one row and 32 rows: ``F.linear`` in float32 and bfloat16,
bfloat16 on oneDNN-prepacked weights (what the fast forward runs), PyTorch's int8 / int4 packed matmuls
with float32 and with bfloat16 activations, and torchao's int8 weight-only and CPU int4 tensors when torchao
is importable (``pip install --no-deps torchao``; not a dependency). This is how ``blora.models.quant``
picked its kernels.

``accuracy``: each variant's logits against the float32 model's on the chat prompts and float32's greedy
continuations (teacher-forced): the largest difference relative to the largest logit, the share of
positions whose top-1 token agrees, and the weight bytes (the README's quantization table).

llama.cpp's q8_0 / q4_0 on the same HTTP load: ``benchmarks/llamacpp_compare.py --quantization int8|int4`` runs
``blora serve --quantization int8|int4`` against ``llama-server`` on the same model as GGUF Q8_0 / Q4_0 (this
script measures the engine only).

Run: ``.venv/bin/python benchmarks/quant_bench.py [engine|ops|accuracy] [--requests 1 4 32] [--rounds 3] [--threads N]``;
the fast forward against transformers' modules on quantized models:
``quant_bench.py engine --variants int8 int4 --fast-path both --requests 1 32 --rounds 2``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = ("float32", "bfloat16", "int8", "int4")
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  # (in, out) of SmolLM2-135M's linears
HEAD_SHAPES = ((576, 49152),)  # its LM head (tied to the input embeddings)
PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List five uses of a paper clip.",
    "What makes bread rise?",
)


# -- engine ------------------------------------------------------------------------------------------------
def build_llms(args) -> dict[str, object]:
    from blora import LLM
    from blora.models import load_model

    loaded = {dt: load_model(args.model, dtype=dt, device="cpu") for dt in ("float32", "bfloat16")}
    adapters = None if args.no_adapters else {"lora": str(make_adapter(loaded["float32"].model))}
    llms = {}
    for name in variant_names(args):
        variant, _, off = name.partition(":")
        quant = variant if variant in ("int8", "int4") else None
        source = loaded[args.quant_dtype if quant else variant]
        model = copy.deepcopy(source.model)  # each LLM wraps its own copy
        fast_path = "off" if off or args.fast_path == "off" else "auto"
        llms[name] = LLM(
            model, tokenizer=source.tokenizer, adapters=adapters, quantization=quant, max_num_seqs=64,
            fast_path=fast_path,
        )  # fmt: skip
    return llms


def variant_names(args) -> list[str]:
    """The variants to run: ``--variants`` in order, each quantized one also as "<method>:off" (on
    transformers' modules) with ``--fast-path both``."""
    names = []
    for variant in args.variants:
        names.append(variant)
        if args.fast_path == "both" and variant in ("int8", "int4"):
            names.append(f"{variant}:off")
    return names


def make_adapter(model) -> Path:
    """A rank-16 adapter on every linear with non-zero B, saved once in a temporary directory."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    path = Path(tempfile.mkdtemp(prefix="quant_bench_")) / "lora"
    peft_model.save_pretrained(str(path))
    return path


def weight_bytes(model) -> int:
    """Bytes of the decoder layers' parameters and buffers (what quantization shrinks)."""
    layers = model.base_model.layers
    tensors = [*layers.parameters(), *layers.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model) -> int:
    """Bytes of all the model's parameters and buffers, each storage once (tied weights, fused views)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()
    }
    return sum(storages.values())


def run_once(llm, requests: int, new_tokens: int, with_adapters: bool) -> float:
    from blora import SamplingParams

    chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(requests)]
    names = [("lora" if with_adapters and i % 2 else None) for i in range(requests)]
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0)
    start = time.perf_counter()
    outs = llm.chat(chats, params, adapters=names)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def bench_engine(args) -> None:
    llms = build_llms(args)
    names = list(llms)
    fast = {n: llm.engine.runner.fast is not None for n, llm in llms.items()}
    print(f"threads: {torch.get_num_threads()}; decoder weights (MB):", end="")
    print("".join(f"  {v} {weight_bytes(llm.engine.model) / 1e6:.0f}" for v, llm in llms.items()))
    print(
        "whole model (MB):"
        + "".join(f"  {v} {model_bytes(llm.engine.model) / 1e6:.0f}" for v, llm in llms.items())
    )
    print("family fast path:", ", ".join(f"{n} {'yes' if f else 'no'}" for n, f in fast.items()))
    pairs = [
        (a, b) for a in ("int8", "int4") for b in ("bfloat16", "float32", f"{a}:off") if {a, b} <= set(names)
    ]
    short = {"bfloat16": "bf16", "float32": "fp32"}
    heads = [f"{a}/{short.get(b, b)}" for a, b in pairs]
    print(f"| requests | {' | '.join(names)} | {' | '.join(heads)} |")
    print("|---:|" + "---:|" * (len(names) + len(pairs)))
    for requests in args.requests:
        for llm in llms.values():  # warm-up
            run_once(llm, requests, 4, not args.no_adapters)
        rates: dict[str, list[float]] = {v: [] for v in names}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else list(reversed(names))
            for variant in order:
                rates[variant].append(
                    run_once(llms[variant], requests, args.new_tokens, not args.no_adapters)
                )
        cells = [f"{statistics.median(rates[v]):.1f}" for v in names]
        ratios = [statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True)) for a, b in pairs]
        print(f"| {requests} | {' | '.join(cells)} | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")


# -- ops ---------------------------------------------------------------------------------------------------
def op_variants(shapes) -> dict[str, Callable[[dict[int, torch.Tensor]], object]]:
    from blora import kernels
    from blora.models.families.packing import Packed
    from blora.models.quant import INT4_GROUP_SIZE, _quantize_int4, _quantize_int8, to_blocks

    torch.manual_seed(0)
    ws = [torch.randn(o, i) / i**0.5 for i, o in shapes]
    wb = [w.bfloat16() for w in ws]
    wp = [Packed.of(w) for w in wb]
    q8 = [_quantize_int8(w) for w in ws]
    q4 = [_quantize_int4(w, INT4_GROUP_SIZE) for w in ws]
    g = INT4_GROUP_SIZE
    bf = torch.bfloat16
    variants = {
        "fp32 F.linear": lambda x: [F.linear(x[w.shape[1]], w) for w in ws],
        "bf16 F.linear": lambda x: [F.linear(x[w.shape[1]].to(bf), w) for w in wb],
        "bf16 prepacked": lambda x: [
            Packed.matmul(x[w.shape[1]].to(bf), p) for w, p in zip(wb, wp, strict=True)
        ],
        "int8 aten, fp32 x": lambda x: [
            torch._weight_int8pack_mm(x[q.shape[1]], q, s.float()) for q, s in q8
        ],
        "int8 aten, bf16 x": lambda x: [torch._weight_int8pack_mm(x[q.shape[1]].to(bf), q, s) for q, s in q8],
        "int4 aten, fp32 x": lambda x: [
            torch._weight_int4pack_mm_for_cpu(x[p.shape[1] * 2], p, g, sz.float()) for p, sz in q4
        ],
        "int4 aten, bf16 x": lambda x: [
            torch._weight_int4pack_mm_for_cpu(x[p.shape[1] * 2].to(bf), p, g, sz) for p, sz in q4
        ],
    }
    kernel = kernels.get()
    if kernel is not None and all(o % 16 == 0 for _, o in shapes):
        blocks = [(to_blocks(q), s) for q, s in q8]
        variants["int8 blora, bf16 x"] = lambda x: [
            kernel.int8_linear(x[b.shape[1]].to(bf), b, s) for b, s in blocks
        ]
    variants.update(torchao_variants(ws))
    return variants


def torchao_variants(ws: list[torch.Tensor]) -> dict[str, Callable]:
    try:
        from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception as exc:  # not a dependency: measured when installed
        print(f"torchao not measured ({type(exc).__name__}: {exc})")
        return {}
    ao8 = []
    for w in ws:
        lin = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
        lin[0].weight.data = w.clone()
        quantize_(lin, Int8WeightOnlyConfig())
        ao8.append(lin[0])
    ao4 = [Int4OpaqueTensor.from_hp(w, [1, 64]) for w in ws]
    return {
        "torchao int8 weight-only": lambda x: [m(x[m.in_features]) for m in ao8],
        "torchao int4 CPU (opaque)": lambda x: [F.linear(x[t.shape[1]], t) for t in ao4],
    }


def bench_ops(args) -> None:
    variants = op_variants(HEAD_SHAPES if args.head else SHAPES)
    times = {(k, b): [] for k in variants for b in (1, 32)}
    for _ in range(args.rounds):
        for rows in (1, 32):
            x = {576: torch.randn(rows, 576), 1536: torch.randn(rows, 1536)}
            for name, fn in variants.items():
                fn(x)
                start = time.perf_counter()
                for _ in range(20):
                    fn(x)
                times[(name, rows)].append((time.perf_counter() - start) / 20 * 1e6)
    what = "the SmolLM2 LM head" if args.head else "the four SmolLM2 linears of one layer"
    print(f"threads: {torch.get_num_threads()}; {what}, median of {args.rounds}")
    print("| kernel | 1 row (us) | vs fp32 | 32 rows (us) | vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    base = {rows: statistics.median(times[("fp32 F.linear", rows)]) for rows in (1, 32)}
    for name in variants:
        cells = []
        for rows in (1, 32):
            t = statistics.median(times[(name, rows)])
            cells += [f"{t:.0f}", f"{base[rows] / t:.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")


# -- accuracy ----------------------------------------------------------------------------------------------
def bench_accuracy(args) -> None:
    """Logits of each quantized variant against the float32 model on the chat prompts (teacher-forced over
    each prompt and float32's greedy continuation): the largest |difference| relative to the largest |logit|
    per prompt, and how often the top-1 tokens agree; weight bytes of the decoder layers and whole model."""
    from blora.models import load_model
    from blora.models.quant import quantize_model

    source = load_model(args.model, dtype="float32", device="cpu")
    tok, ref = source.tokenizer, source.model.eval()
    seqs = []
    for prompt in PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            seqs.append(ref.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0))
    with torch.no_grad():
        want = [ref(s).logits[0].float() for s in seqs]
    print(
        f"{args.model or 'the embedded SmolLM2'}: logits vs float32 over {len(PROMPTS)} chat prompts + {args.new_tokens} greedy tokens"
    )
    print("| variant | decoder bytes | model bytes | max |diff| / max |logit| | top-1 equal |")
    print("|---|---:|---:|---:|---:|")
    for variant in [v for v in args.variants if v != "float32"]:
        quant = variant if variant in ("int8", "int4") else None
        model = copy.deepcopy(source.model).to(getattr(torch, args.quant_dtype if quant else variant))
        if quant:
            quantize_model(model, quant)
        rel, equal, total = 0.0, 0, 0
        with torch.no_grad():
            for s, w in zip(seqs, want, strict=True):
                got = model(s).logits[0].float()
                rel = max(rel, ((got - w).abs().max() / w.abs().max()).item())
                equal += int((got.argmax(-1) == w.argmax(-1)).sum())
                total += w.shape[0]
        print(
            f"| {variant} | {weight_bytes(model) / 1e6:.0f} MB | {model_bytes(model) / 1e6:.0f} MB | {100 * rel:.1f}% "
            f"| {100 * equal / total:.0f}% |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["engine", "ops", "accuracy"], default="engine")
    parser.add_argument("--model", default=None, help="model path / .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-adapters", action="store_true", help="base-only requests")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--quant-dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="the dtype of the model the int8 / int4 variants quantize (activations, norms, adapters)",
    )
    parser.add_argument(
        "--fast-path",
        choices=["auto", "off", "both"],
        default="auto",
        help="the model family's own forward (auto), transformers' modules (off), or the quantized "
        "variants on both (engine mode)",
    )
    parser.add_argument("--head", action="store_true", help="ops: the LM head's shape")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"ops": bench_ops, "accuracy": bench_accuracy}.get(args.mode, bench_engine)(args)


if __name__ == "__main__":
    main()
