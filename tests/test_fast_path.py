"""The engine's own family forwards (``blora.models.families``: Llama, Qwen3, Phi-3, Gemma 2/3) vs transformers' modules.

Every engine step of a mixed batch (chunked prefills, decodes, several adapters, base rows) runs through
both paths on the same KV cache and must give the same logits; greedy tokens must equal transformers
``generate`` / PEFT (tests/test_engine.py checks those for every family with the fast path on).
The engines here force the fast path (``fast_path="on"``), so it runs on any CPU the kernels build for,
the portable build included.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blora import kernels
from blora.engine import LLM, SamplingParams
from blora.engine.llm import build_engine
from blora.models import families
from blora.models.families import FastPathOptions, packing
from tests.helpers import (
    make_adapter,
    random_prompts,
    run_each_step_both_ways,
    targets,
    tiny_model,
    tokenizer,
)

pytestmark = pytest.mark.usefixtures("needs_kernels")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


ON = FastPathOptions(mode="on")


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN prepacks weights of ``dtype`` on this CPU (bfloat16 needs AVX-512 or AVX-NE-CONVERT)."""
    try:
        packing.Packed.of(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


CASES = [(arch, dtype, None) for arch in FAMILIES for dtype in (torch.float32, torch.bfloat16)]
CASES.append(("qwen2", torch.float32, 16))  # a tiny kernel bound: prefill LoRA as GEMMs into fused slices


@pytest.mark.parametrize(
    "arch,dtype,max_work", CASES, ids=lambda v: str(v).replace("torch.", "") if v is not None else "default"
)
def test_every_step_matches_transformers_modules(arch, dtype, max_work, tmp_path, monkeypatch, one_thread):
    model = tiny_model(arch, dtype=dtype)
    adapters = {
        "attn": make_adapter(model, tmp_path / "attn", seed=1, r=4, lora_alpha=8, target_modules=targets(arch, "attn")),
        "all": make_adapter(model, tmp_path / "all", seed=2, r=8, lora_alpha=8, target_modules=targets(arch, "all")),
        "mlp": make_adapter(model, tmp_path / "mlp", seed=3, r=2, lora_alpha=4, target_modules=targets(arch, "mlp")),
    }  # fmt: skip
    engine = build_engine(
        model,
        tokenizer=tokenizer(),
        max_num_batched_tokens=48,
        block_size=4,
        max_loras=3,
        fast_path="on",
        fused_lora_kernel_max_work=max_work or kernels.FUSED_MAX_WORK,
    )
    runner = engine.runner
    assert runner.fast is not None, "a Llama-family model on CPU must get the fast path"
    if can_pack(dtype):
        assert runner.fast.layers[0].packed and runner.fast.head_packed is not None, (
            "weights must be prepacked"
        )
    else:
        assert runner.fast.layers[0].packed == {}, "this CPU has no oneDNN prepacking for this dtype"
    names = ["attn", None, "all", "mlp", "all", None]
    worst = run_each_step_both_ways(engine, adapters, list(zip(random_prompts(6), names, strict=True)))
    # measured here: float32 ~4e-7 (order of float32 sums), bfloat16 0.0 (bit-identical); a skipped rotary
    # on the keys gives 3e-2 to 6e-2
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert len(worst) > 6 and max(worst) < tol, worst


def test_swapped_module_falls_back_to_transformers():
    """A module replaced after start-up (as ``modules_to_save`` does; the one who replaces it bumps the model's
    structure version) sends the step to transformers' modules; the fused q/k/v and gate/up weights stay
    views the original modules read, so the output is unchanged."""
    model = tiny_model("llama")
    prompts = random_prompts(3)
    params = SamplingParams(max_tokens=5, temperature=0.0)
    llm = LLM(model, tokenizer=tokenizer(), fast_path="on")
    runner = llm.engine.runner
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert runner.fast_steps > 0
    layer = model.model.layers[1]
    layer.mlp.down_proj = nn.Sequential(layer.mlp.down_proj)  # same function, another module
    families.bump_structure_version(model)
    steps = runner.fast_steps
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert runner.fast_steps == steps, "a swapped module must disable the fast path"
    assert again == first
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        for prompt, tokens in zip(prompts, first, strict=True):
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert ref[0, len(prompt) :].tolist() == tokens


def _head_adapter_engine(tmp_path, seed: int, **config):
    """(base model, lm_head + q_proj adapter dir, engine over a copy of the model serving it as "head")."""
    model = tiny_model("llama")
    adapter = make_adapter(
        model, tmp_path / "head", seed=seed, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]
    )
    engine = LLM(
        tiny_model("llama"), tokenizer=tokenizer(), adapters={"head": str(adapter)}, fast_path="on", **config
    )
    return model, adapter, engine


def _assert_equals_peft_alone(model, adapter, prompts, outs, max_tokens: int) -> None:
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        for prompt, out in zip(prompts, outs, strict=True):
            ref = peft.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
            )
            assert ref[0, len(prompt) :].tolist() == out.outputs[0].token_ids


def test_unpacked_weights_and_wrapped_head(tmp_path):
    """Without prepacked weights (``packed_weights=False``) and with an lm_head LoRA (the head module
    is wrapped, so the packed head copy must not be used), outputs still equal PEFT's."""
    model, adapter, llm = _head_adapter_engine(tmp_path, seed=5, packed_weights=False)
    assert llm.engine.runner.fast.layers[0].packed == {}
    prompts = random_prompts(3)
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0), adapters="head")
    assert llm.engine.runner.fast_steps > 0
    _assert_equals_peft_alone(model, adapter, prompts, outs, 5)


def test_packed_head_is_not_used_when_the_head_is_wrapped(tmp_path):
    model, adapter, llm = _head_adapter_engine(tmp_path, seed=6)
    assert llm.engine.runner.fast.head_packed is not None
    prompts = random_prompts(2)
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0), adapters="head")
    _assert_equals_peft_alone(model, adapter, prompts, outs, 4)


def test_head_wrapped_before_start_up_is_not_packed():
    """A head already wrapped when the engine starts (an lm_head LoRA attached earlier) must run as the
    wrapper, never through a packed copy of its base weight."""
    from blora.lora.layers import LoraLinear

    model = tiny_model("llama")
    model.lm_head = LoraLinear(model.lm_head)
    fast = families.build(model, ON)
    assert fast is not None and fast.head_packed is None and fast.layers[0].packed
    assert fast.logits(torch.randn(2, model.config.hidden_size)) is None


def test_unsupported_models_use_transformers_modules():
    auto = FastPathOptions(mode="auto")
    assert families.build(tiny_model("gpt2"), auto) is None
    assert families.build(tiny_model("llama", dtype=torch.float16), auto) is None
    assert families.build(tiny_model("llama"), FastPathOptions(mode="off")) is None
    # "on" where it cannot run is an error that says why, not a silent fallback
    with pytest.raises(ValueError, match="fast_path='on'.*no model family"):
        families.build(tiny_model("gpt2"), ON)
    with pytest.raises(ValueError, match="fast_path='on'.*float16"):
        families.build(tiny_model("llama", dtype=torch.float16), ON)
    with pytest.raises(ValueError, match="fast_path must be"):
        build_engine(tiny_model("llama"), tokenizer=tokenizer(), fast_path="yes")
    with pytest.raises(ValueError, match="cpu_kernel=False"):
        build_engine(tiny_model("llama"), tokenizer=tokenizer(), fast_path="on", cpu_kernel=False)
    engine = build_engine(tiny_model("llama"), tokenizer=tokenizer(), fast_path="on", lora_backend="torch")
    assert engine.runner.fast is not None and engine.runner.backend.name == "torch"
    kernel = kernels.get()
    native = build_engine(tiny_model("llama"), tokenizer=tokenizer()).runner.fast is not None
    assert native == kernel.native_vector, "fast_path='auto' runs it exactly where the AVX-512 build is"


def test_no_packed_copy_when_memory_is_short(monkeypatch):
    """The prepacked copy needs as much memory as the linear weights: skipped when that is over half of
    what is available (the fast path still runs, on the plain weights)."""
    monkeypatch.setattr(packing, "available_memory", lambda: 1024)
    fast = families.build(tiny_model("llama"), ON)
    assert fast is not None and fast.layers[0].packed == {} and fast.head_packed is None
    monkeypatch.setattr(packing, "available_memory", lambda: 1 << 40)
    fast = families.build(tiny_model("llama"), ON)
    assert fast.layers[0].packed and fast.head_packed is not None
