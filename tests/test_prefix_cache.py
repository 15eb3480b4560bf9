"""Prefix caching in the engine: greedy outputs are the same with and without it (several adapters, base
rows, a mixture, n>1, chunked prefill, preemption, a sliding window), only the same adapter (and weight
version) shares blocks, a replaced or re-registered adapter's blocks are never hit, and the counters say
how many prompt tokens were reused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from blora.engine import LLM, SamplingParams
from blora.engine.llm import build_engine
from tests.helpers import make_adapter, targets, tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BS = 4
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
MIX = {"a0": 0.7, "a1": 0.3}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("prefix-adapters")
    kinds = ["attn", "all", "mlp"]
    return {
        f"a{i}": make_adapter(
            base, root / f"a{i}", seed=i, r=4, lora_alpha=8, target_modules=targets("llama", k)
        )
        for i, k in enumerate(kinds)
    }


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, len(tokenizer()), (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = random_ids(41, 0)  # a shared "system prompt" of 10 full blocks and a partial one
PROMPTS = [SYSTEM + random_ids(n, 10 + i) for i, n in enumerate([3, 9, 1, 14, 6, 0, 7, 12])]
ADAPTERS = ["a0", "a1", None, "a2", MIX, "a0", None, "a1"]


def run_waves(engine, prompts, adapters, params=GREEDY) -> dict[str, list[list[int]]]:
    """Two waves: the second arrives after the first has started, so it can hit the first's blocks."""
    done: dict[str, list[list[int]]] = {}
    half = len(prompts) // 2
    for wave in (range(half), range(half, len(prompts))):
        for i in wave:
            engine.add_request(str(i), prompts[i], params, adapters[i])
        for _ in range(4):
            collect(engine.step(), done)
    while engine.has_unfinished_requests():
        collect(engine.step(), done)
    assert engine.block_manager.usage == 0.0
    return done


def collect(outputs, done) -> None:
    for out in outputs:
        assert out.error is None
        if out.finished:
            done[out.request_id] = [c.token_ids for c in out.outputs]


def engine_pair(dirs, **config):
    return [
        build_engine(
            tiny_model("llama"), tokenizer=tokenizer(), adapters=dirs, enable_prefix_caching=on, **config
        )
        for on in (True, False)
    ]


@pytest.mark.parametrize(
    "config",
    [
        dict(block_size=BS),
        dict(block_size=BS, max_num_batched_tokens=16),  # chunked prefill: the suffix in several chunks
        dict(block_size=BS, num_kv_blocks=30, max_num_batched_tokens=32),  # preemption (and recompute)
    ],
    ids=["plain", "chunked", "preempted"],
)
def test_outputs_equal_with_and_without_the_cache(dirs, config):
    cached, plain = engine_pair(dirs, **config)
    with_cache = run_waves(cached, PROMPTS, ADAPTERS)
    assert with_cache == run_waves(plain, PROMPTS, ADAPTERS)
    stats = cached.stats()
    assert stats["prefix_cache_hits_total"] > 0 and 0 < stats["prefix_cache_hit_rate"] < 1
    assert plain.stats()["prefix_cache_queries_total"] == 0
    if "num_kv_blocks" in config:
        assert cached.num_preemptions_total > 0 and plain.num_preemptions_total > 0


def test_n_greater_than_one_and_repeated_prompts(dirs):
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=7, n=3)
    cached, plain = engine_pair(dirs, block_size=BS)
    prompts, adapters = [PROMPTS[1]] * 4, ["a1", "a1", None, MIX]
    assert run_waves(cached, prompts, adapters, params) == run_waves(plain, prompts, adapters, params)
    # the first sequence computes the 12 full blocks before the last token; the 9 others wait a step to
    # share them (same adapter a1: 5 sequences; base: 2; the mixture: 2)
    assert cached.stats()["prefix_cache_hits_total"] == 9 * 48


def test_hits_are_counted_per_adapter_identity(dirs):
    """The same prompt on base, each adapter and a mixture: nothing shared; again on each: all full blocks
    but the one holding the last token hit."""
    engine = build_engine(tiny_model("llama"), tokenizer=tokenizer(), adapters=dirs, block_size=BS)
    prompt = PROMPTS[0]  # 44 tokens: 11 full blocks; the last holds the last token, so 10 can hit
    owners = [None, "a0", "a1", "a2", MIX, {"a0": 0.3, "a1": 0.7}]
    for rnd in range(2):
        for adapter in owners:
            before = engine.stats()["prefix_cache_hits_total"]
            engine.add_request(None, prompt, GREEDY, adapter)
            while engine.has_unfinished_requests():
                engine.step()
            assert engine.stats()["prefix_cache_hits_total"] - before == (0 if rnd == 0 else 40), adapter
    stats = engine.stats()
    assert stats["prefix_cache_queries_total"] == 2 * len(owners) * len(prompt)
    assert stats["prefix_cache_hit_rate"] == pytest.approx(
        len(owners) * 40 / stats["prefix_cache_queries_total"]
    )


def test_reset_makes_the_next_run_cold_with_the_same_outputs(dirs):
    """``LLM.reset_prefix_cache`` between two ``generate`` calls on the same prompts: the second computes
    every prompt again (no hit) and gives the same tokens; without the reset it hits."""
    llm = LLM(tiny_model("llama"), tokenizer=tokenizer(), adapters=dirs, block_size=BS)

    def hits_of_one_run() -> tuple[int, list]:
        before = llm.stats()["prefix_cache_hits_total"]
        outs = llm.generate(PROMPTS, GREEDY, adapters=ADAPTERS)
        return llm.stats()["prefix_cache_hits_total"] - before, [o.outputs[0].token_ids for o in outs]

    first, tokens = hits_of_one_run()  # hits within the run: prompts that share SYSTEM and adapter
    warm, same = hits_of_one_run()
    assert warm > first and same == tokens
    assert llm.reset_prefix_cache()
    assert hits_of_one_run() == (first, tokens)


def test_replacing_an_adapter_invalidates_its_blocks(dirs):
    engine = build_engine(tiny_model("llama"), tokenizer=tokenizer(), adapters=dirs, block_size=BS)
    fresh = build_engine(
        tiny_model("llama"), tokenizer=tokenizer(), block_size=BS, enable_prefix_caching=False
    )
    fresh.load_adapter("a0", dirs["a2"])

    def run(eng, adapter) -> tuple[list[int], int]:
        before = eng.stats()["prefix_cache_hits_total"]
        eng.add_request(None, PROMPTS[3], GREEDY, adapter)
        out = None
        while eng.has_unfinished_requests():
            out = next((o for o in eng.step() if o.finished), out)
        return out.outputs[0].token_ids, eng.stats()["prefix_cache_hits_total"] - before

    old, _ = run(engine, "a0")
    run(engine, MIX)
    engine.load_adapter("a0", dirs["a2"], replace=True)  # same name, other weights
    new, hits = run(engine, "a0")
    assert hits == 0 and new == run(fresh, "a0")[0] and new != old
    assert run(engine, MIX)[1] == 0  # a mixture built from the old weights is not hit either
    assert run(engine, "a0")[1] > 0  # the new weights' blocks are shared as usual
    engine.unload_adapter("a0")
    engine.load_adapter("a0", dirs["a0"])  # unloaded and registered again: a new version too
    again, hits = run(engine, "a0")
    assert hits == 0 and again == old


def test_sliding_window_with_a_cached_prefix_longer_than_the_window():
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer()), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8,
    )  # fmt: skip
    model = MistralForCausalLM(config).eval()
    outs = {}
    for on in (True, False):
        llm = LLM(model, tokenizer=tokenizer(), block_size=BS, enable_prefix_caching=on)
        first = llm.generate(PROMPTS[:2], GREEDY)
        outs[on] = [o.outputs[0].token_ids for o in first + llm.generate(PROMPTS[2:], GREEDY)]
        assert (llm.engine.stats()["prefix_cache_hits_total"] > 0) == on
    assert outs[True] == outs[False]


def test_benchmark_quick_run(tmp_path):
    """``benchmarks/prefix_cache_bench.py --quick`` runs end to end; only the cached runs hit."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "prefix_cache_bench.py"
    spec = importlib.util.spec_from_file_location("prefix_cache_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--adapter-dir", str(tmp_path), "--out", str(tmp_path / "pc")]) == 0
    finally:
        torch.set_num_threads(threads)
    median = json.loads((tmp_path / "pc.json").read_text())["median"]
    assert median["on"]["hit_rate"] > 0.3 and median["off"]["hit_rate"] == 0.0
    assert "| on |" in (tmp_path / "pc.md").read_text()


def test_server_switch_and_metrics():
    """``blora serve --no-prefix-caching`` (or vLLM's ``--no-enable-prefix-caching``) turns it off; /metrics
    carries vLLM's prefix-cache counters."""
    import argparse

    from blora.server.metrics import ServerMetrics
    from blora.server.options import add_serve_arguments, engine_args

    parser = add_serve_arguments(argparse.ArgumentParser())
    for argv, on in (([], True), (["--no-prefix-caching"], False), (["--no-enable-prefix-caching"], False)):
        assert engine_args(parser.parse_args(argv)).config.enable_prefix_caching is on

    class Engine:
        def stats(self) -> dict:
            return {"prefix_cache_queries_total": 20, "prefix_cache_hits_total": 8}

    body = ServerMetrics(Engine(), "m", 4).render().decode()
    assert 'blora:prefix_cache_queries_total{model_name="m"} 20.0' in body
    assert 'blora:prefix_cache_hits_total{model_name="m"} 8.0' in body
