"""Routing benchmark: how often a request lands on a replica that already holds its adapter, and how many
adapter loads that costs, with adapter affinity (Ray Serve model multiplexing) and with Ray's default
routing, for several replica counts. A tiny random Llama and its adapters are written to a temporary
directory; a local Ray cluster is started; every configuration is deployed in turn and sent the same
power-law (Zipf) trace over HTTP.

    python benchmarks/routing_bench.py --replicas 1 2 4 --adapters 16 --resident 4

Only routing is measured here: the model is tiny, so the cost of a load is not (the README gives the
cold-load latency of real adapters).
"""

from __future__ import annotations

import argparse
import random
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def write_files(root: Path, n_adapters: int) -> tuple[Path, dict[str, str]]:
    """A tiny random Llama (SmolLM2 tokenizer) and ``n_adapters`` PEFT adapters with non-zero weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from blora.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    adapters = {}
    for i in range(n_adapters):
        torch.manual_seed(i + 1)
        lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(LlamaForCausalLM(cfg), lora).save_pretrained(root / f"t{i}")
        adapters[f"t{i}"] = str(root / f"t{i}")
    return root / "model", adapters


def power_law_trace(names: list[str], n: int, s: float = 1.1, seed: int = 0) -> list[str]:
    """``n`` adapter names drawn with Zipf(``s``) popularity (the first name most often)."""
    weights = [1 / (k + 1) ** s for k in range(len(names))]
    return random.Random(seed).choices(names, weights, k=n)


def replica_counts(app: str) -> dict[str, tuple[int, int, int]]:
    """replica -> (adapter requests, of which found resident, adapter loads), from the registry."""
    from ray import serve

    state = serve.get_deployment_handle("AdapterRegistry", app_name=app).state.remote().result()
    return {
        name: (s["adapter_requests"], s["adapter_hits"], s["adapter_loads"])
        for name, (_, s) in state.reports.items()
    }


def run_trace(url: str, app: str, trace: list[str], warmup: int, concurrency: int = 4, headers=None) -> dict:
    """Send ``trace`` (the first ``warmup`` requests not measured); hit rate and loads per replica."""

    def send(model: str) -> None:
        body = {"model": model, "prompt": "Hello there", "max_tokens": 2, "temperature": 0}
        resp = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)
        resp.raise_for_status()

    def settled(total: int) -> dict[str, tuple[int, int, int]]:
        deadline = time.monotonic() + 30
        while sum(c[0] for c in replica_counts(app).values()) < total:
            if time.monotonic() > deadline:
                raise TimeoutError("replica reports did not catch up")
            time.sleep(0.1)
        return replica_counts(app)

    time.sleep(0.5)  # let earlier requests reach the reports (replicas report every report_interval_s)
    base = sum(c[0] for c in replica_counts(app).values())
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, trace[:warmup]))
        before = settled(base + warmup)
        t0 = time.monotonic()
        list(pool.map(send, trace[warmup:]))
        seconds = time.monotonic() - t0
    after = settled(base + len(trace))
    zero = (0, 0, 0)
    requests = sum(after[r][0] - before.get(r, zero)[0] for r in after)
    hits = sum(after[r][1] - before.get(r, zero)[1] for r in after)
    return {
        "requests": requests,
        "hit_rate": hits / requests if requests else 0.0,
        "loads": sorted(after[r][2] - before.get(r, zero)[2] for r in after),
        "req_per_s": (len(trace) - warmup) / seconds,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python benchmarks/routing_bench.py", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--adapters", type=int, default=16, help="distinct adapters in the trace")
    p.add_argument("--resident", type=int, default=4, help="adapters resident per replica")
    p.add_argument("--requests", type=int, default=300, help="measured requests")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--cpus", type=float, default=2, help="Ray CPUs of the local cluster")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from blora.ray.app import ClusterConfig, build_app
    from blora.server.app import ServerConfig

    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = write_files(Path(tmp), args.adapters)
        trace = power_law_trace(list(adapters), args.warmup + args.requests, args.zipf)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rows = []
        try:
            for replicas in args.replicas:
                for affinity in (True, False):
                    engine = dict(model=str(model), dtype="float32", device="cpu", max_model_len=256)
                    cluster = ClusterConfig(
                        replicas=replicas, max_adapters_per_replica=args.resident, affinity=affinity,
                        replica_cpus=args.cpus / 2 / replicas, threads=1, report_interval_s=0.2,
                    )  # fmt: skip
                    server = ServerConfig(served_model_name="tiny", max_num_seqs=64 * replicas)
                    serve.run(build_app(engine, server, cluster, adapters), name="bench", route_prefix="/")
                    result = run_trace(f"http://127.0.0.1:{port}", "bench", trace, args.warmup)
                    serve.delete("bench")
                    rows.append((replicas, "multiplexed" if affinity else "Ray default", result))
                    print(replicas, rows[-1][1], result, flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\n{args.adapters} adapters, Zipf {args.zipf}, {args.resident} resident per replica, "
          f"{args.requests} requests after {args.warmup} of warm-up, 4 in flight\n")  # fmt: skip
    print("| replicas | routing | hit rate | adapter loads per replica | req/s |\n|---|---|---:|---|---:|")
    for replicas, routing, r in rows:
        print(f"| {replicas} | {routing} | {r['hit_rate']:.1%} | {r['loads']} | {r['req_per_s']:.1f} |")


if __name__ == "__main__":
    main()
