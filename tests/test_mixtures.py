"""Per-request weighted mixtures of adapters, computed in the batch without merging into the base model:
equal to PEFT's ``add_weighted_adapter(..., combination_type="cat")`` and, layer by layer, to the exact
weighted sum of the adapters' LoRA terms (also for LoRA bias, embedding LoRA and rsLoRA components).
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from peft import PeftModel

from blora.engine import LLM, AsyncLLM, SamplingParams
from blora.lora import AdapterError, lora_batch
from blora.lora.manager import LoraManager
from blora.lora.mixtures import Mixture, combine
from blora.lora.store import AdapterInUseError
from tests.helpers import make_adapter, tiny_model, tokenizer
from tests.test_adapter_kinds import make_kind_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [5, 17, 300, 42, 7, 1000, 12]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
MIX = {"a": 0.5, "b": 0.7}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("mix")
    dirs = {
        "a": make_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": make_adapter(
            base, root / "b", seed=2, r=8, lora_alpha=16, target_modules=["v_proj", "down_proj"]
        ),
        "c": make_adapter(base, root / "c", seed=3, r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"]),
        "bias": make_kind_adapter(
            base, root / "bias", 4, r=3, lora_alpha=6, target_modules=["o_proj"], lora_bias=True
        ),
        "emb": make_kind_adapter(
            base,
            root / "emb",
            5,
            r=2,
            lora_alpha=4,
            target_modules=["embed_tokens", "q_proj"],
            use_rslora=True,
        ),
        "dora": make_kind_adapter(base, root / "dora", 6, r=2, target_modules=["q_proj"], use_dora=True),
    }
    return base, {k: str(v) for k, v in dirs.items()}


def peft_cat(base, dirs, mix: dict[str, float]):
    names = list(mix)
    model = PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    model.add_weighted_adapter(names, [mix[n] for n in names], "mix", combination_type="cat")
    model.set_adapter("mix")
    return model.eval()


def peft_greedy(model, prompt) -> tuple[list[int], list[torch.Tensor]]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), [torch.log_softmax(s[0].float(), -1) for s in out.scores]


def check_against(out, ref_tokens, ref_logprobs) -> None:
    completion = out.outputs[0]
    assert completion.token_ids == ref_tokens
    for step, top in enumerate(completion.logprobs):
        for token, logprob in top.items():
            assert abs(logprob - float(ref_logprobs[step][token])) < 1e-4


def test_mixture_in_a_batch_equals_peft_cat(env):
    base, dirs = env
    llm = LLM(tiny_model("llama"), tokenizer=tokenizer(), adapters=dirs, block_size=4, max_loras=3)
    reversed_mix = {"b": 0.7, "a": 0.5}  # order does not matter
    adapters = [MIX, "a", None, reversed_mix, {"a": 1.0}, {"a": 0.3, "c": -0.4}]
    outs = llm.generate([PROMPT] * len(adapters), GREEDY, adapters=adapters)
    mix_ref = peft_greedy(peft_cat(base, dirs, MIX), PROMPT)
    a_ref = peft_greedy(PeftModel.from_pretrained(copy.deepcopy(base), dirs["a"]).eval(), PROMPT)
    check_against(outs[0], *mix_ref)
    check_against(outs[1], *a_ref)
    check_against(outs[3], *mix_ref)
    check_against(outs[4], *a_ref)  # a weight-1 mixture of one adapter is that adapter
    check_against(outs[5], *peft_greedy(peft_cat(base, dirs, {"a": 0.3, "c": -0.4}), PROMPT))
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids != outs[0].outputs[0].token_ids
    assert outs[0].adapter == Mixture.parse(MIX).key


def test_mixture_is_the_weighted_sum_of_lora_terms_per_layer(env):
    """Every module of a mixture of a LoRA-bias, an embedding + rsLoRA and a plain adapter computes
    ``base(x) + sum_i w_i * (peft_i(x) - base(x))``."""
    base, dirs = env
    weights = {"bias": 0.6, "emb": -1.3, "c": 2.0}
    model = copy.deepcopy(base)
    manager = LoraManager.attach(model)
    parts = [(manager.prepare(n, dirs[n], device="cpu"), w) for n, w in weights.items()]
    key = Mixture.parse(weights).key
    slot = manager.install(combine(key, parts))
    pefts = {n: PeftModel.from_pretrained(copy.deepcopy(base), dirs[n]).eval() for n in weights}
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for module_name in combine(key, parts).modules:
        ours = model.get_submodule(module_name)
        plain = base.get_submodule(module_name)
        if isinstance(plain, torch.nn.Embedding):
            x = torch.randint(0, plain.num_embeddings, (2, 7), generator=gen)
        else:
            x = torch.randn(2, 7, plain.weight.shape[1], generator=gen)
        with torch.no_grad():
            y_base = plain(x)
            ref = y_base.clone()
            for name, w in weights.items():
                peft_module = pefts[name].base_model.model.get_submodule(module_name)
                if hasattr(peft_module, "base_layer"):
                    ref += w * (peft_module(x) - y_base)
            with lora_batch(torch.full((14,), slot)):
                got = ours(x)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), module_name
        checked += 1
    assert checked >= 5


def test_async_generate_accepts_a_mixture(env):
    base, dirs = env

    async def main():
        llm = AsyncLLM(tiny_model("llama"), tokenizer=tokenizer(), adapters=dirs, block_size=4)
        try:
            last = None
            async for out in llm.generate(PROMPT, GREEDY, adapter=MIX):
                last = out
            return last
        finally:
            await llm.shutdown()

    check_against(asyncio.run(main()), *peft_greedy(peft_cat(base, dirs, MIX), PROMPT))


def test_mixture_errors_are_clear(env):
    base, dirs = env
    llm = LLM(tiny_model("llama"), tokenizer=tokenizer(), adapters=dirs, block_size=4)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        llm.generate(PROMPT, GREEDY, adapters={"a": 0.5, "nope": 0.5})
    for bad in ({}, {"a": float("nan")}, {"a": "x"}, {"a": True}):
        with pytest.raises(AdapterError):
            llm.generate(PROMPT, GREEDY, adapters=bad)
    with pytest.raises(AdapterError, match="DoRA .* cannot be mixed"):
        llm.generate(PROMPT, GREEDY, adapters={"a": 0.5, "dora": 0.5})
    with pytest.raises(AdapterError, match="reserved for mixtures"):
        llm.engine.register_adapter("mixture:x", dirs["a"])
    assert not llm.engine.has_unfinished_requests()


def test_components_are_held_and_replacing_one_rebuilds_the_mixture(env):
    base, dirs = env
    llm = LLM(
        tiny_model("llama"), tokenizer=tokenizer(), adapters={"a": dirs["a"], "b": dirs["b"]}, block_size=4
    )
    engine = llm.engine
    engine.add_request("m", PROMPT, GREEDY, MIX)
    engine.step()
    with pytest.raises(AdapterInUseError):
        engine.unload_adapter("b")
    future = engine.load_adapter("b", dirs["c"], replace=True, wait=True)
    engine.add_request("m2", PROMPT, GREEDY, MIX)  # runs on the new "b"
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert future.done()
    check_against(final["m"], *peft_greedy(peft_cat(base, dirs, MIX), PROMPT))
    new_dirs = {"a": dirs["a"], "b": dirs["c"]}
    check_against(final["m2"], *peft_greedy(peft_cat(base, new_dirs, MIX), PROMPT))
