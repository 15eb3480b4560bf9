"""DoRA, embedding LoRA, ``lm_head`` LoRA, ``modules_to_save`` and LoRA bias in mixed batches.

PEFT refuses DoRA in mixed batches, so every row is compared with PEFT running that row's adapter alone
(fp32, within 1e-4 relative). The adapters are built with PEFT and then perturbed so that every feature
changes the output: non-zero B, DoRA magnitudes away from the weight norm (PEFT initializes them to it, which
makes DoRA's scale exactly 1), non-zero LoRA biases, and modules_to_save copies that differ from the base.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from blora import load_loras, prepare_batch
from blora.engine import LLM, SamplingParams
from blora.lora import AdapterError
from tests.helpers import targets, tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REL_TOL = 1e-4
EMBED = {"gpt2": "wte", "default": "embed_tokens"}
NORM = {"gpt2": "ln_f", "default": "norm"}  # "norm" also matches every layer's *_layernorm (PEFT: endswith)


def kinds(arch: str) -> dict[str, dict]:
    embed, norm = EMBED.get(arch, EMBED["default"]), NORM.get(arch, NORM["default"])
    attn, mlp, every = targets(arch, "attn"), targets(arch, "mlp"), targets(arch, "all")
    return {
        "plain": dict(r=4, lora_alpha=8, target_modules=attn),
        "dora": dict(r=4, lora_alpha=8, target_modules=every, use_dora=True),
        "dora_rs": dict(r=6, lora_alpha=4, target_modules=mlp, use_dora=True, use_rslora=True),
        "bias": dict(r=3, lora_alpha=6, target_modules=attn + mlp, lora_bias=True),
        "emb": dict(r=5, lora_alpha=10, target_modules=[embed, *attn]),
        "emb_dora": dict(r=2, lora_alpha=4, target_modules=[embed], use_dora=True),
        "head": dict(r=4, lora_alpha=4, target_modules=["lm_head", *mlp]),
        "saved": dict(r=2, lora_alpha=4, target_modules=attn, modules_to_save=["lm_head", norm]),
        "saved_emb": dict(r=3, lora_alpha=3, target_modules=mlp, modules_to_save=[embed]),
    }


LONG = "The quick brown fox jumps over the lazy dog and runs far away into the dark forest again"
PROMPTS = ["Hi", LONG, "Once upon a time", "x", "What is the capital of France?", "The weather is"]


def make_kind_adapter(model, path, seed: int, **kwargs):
    """A PEFT adapter where every part differs from what would make it a no-op."""
    torch.manual_seed(seed)
    if type(model).__name__.startswith("GPT2"):
        kwargs.setdefault("fan_in_fan_out", True)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "lora_embedding_A" in name:
                p.normal_(0, 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.2 * (p.abs().mean() + 0.1))
    peft_model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def family(request, tmp_path_factory):
    arch = request.param
    base = tiny_model(arch)
    root = tmp_path_factory.mktemp(f"kinds-{arch}")
    dirs = {
        name: str(make_kind_adapter(base, root / name, seed=i, **kw))
        for i, (name, kw) in enumerate(kinds(arch).items())
    }
    return arch, base, dirs


def rows_for(dirs) -> list[tuple[str, str | None]]:
    """Every kind once, base rows, and repeats with other prompt lengths."""
    rows = [(PROMPTS[i % len(PROMPTS)], n) for i, n in enumerate(dirs)]
    return rows + [("Hello there", None), (LONG, "dora"), ("x", "saved"), (LONG, None)]


def peft_alone(base, path: str | None, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if path is None:
            return base(input_ids=ids).logits[0]
        model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
        return model(input_ids=ids).logits[0]


def test_mixed_batch_rows_match_peft_alone(family, tok):
    arch, base, dirs = family
    model, lora_map = load_loras(copy.deepcopy(base), dirs)
    rows = rows_for(dirs)
    batch = prepare_batch(rows, tok, model, lora_map)
    with torch.no_grad():
        logits = model(**batch).logits
    cache: dict = {}
    for i, (prompt, name) in enumerate(rows):
        path = None if name is None else dirs[name]
        ids = torch.tensor([tok(prompt)["input_ids"]])
        key = (prompt, path)
        if key not in cache:
            cache[key] = peft_alone(base, path, ids)
        ref = cache[key]
        got = logits[i, -ids.shape[1] :]
        err = (got - ref).abs().max() / ref.abs().max()
        assert err < REL_TOL, f"{arch} row {i} ({name}): rel err {err:.2e}"
        if name is not None:
            base_ref = cache.setdefault((prompt, None), peft_alone(base, None, ids))
            assert (ref - base_ref).abs().max() > 1e-3, f"{name} does not change the output"


def test_engine_greedy_tokens_match_peft_generate(family):
    arch, base, dirs = family
    if arch == "qwen2":
        pytest.skip("library-mode check covers qwen2; the engine check runs on llama and gpt2")
    tok = tokenizer()
    llm = LLM(copy.deepcopy(base), tokenizer=tok, adapters=dirs, block_size=4, max_loras=4)
    names = [*dirs, None]
    prompts = [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(len(names))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), adapters=names)
    for name, prompt, out in zip(names, prompts, outs, strict=True):
        model = base if name is None else PeftModel.from_pretrained(copy.deepcopy(base), dirs[name]).eval()
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist(), f"{arch} {name}"


# --------------------------------------------------------------------------------- still refused, clearly


def edit_config(path, **changes) -> None:
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))


def test_modules_to_save_of_a_whole_block_is_refused(tmp_path):
    base = tiny_model("llama")
    path = make_kind_adapter(
        base, tmp_path / "mlp", 0, r=2, target_modules=["q_proj"], modules_to_save=["mlp"]
    )
    with pytest.raises(AdapterError, match="modules_to_save of a LlamaMLP is not supported"):
        load_loras(copy.deepcopy(base), {"mlp": str(path)})


def test_dora_weights_without_use_dora_are_refused(tmp_path):
    base = tiny_model("llama")
    path = make_kind_adapter(base, tmp_path / "d", 0, r=2, target_modules=["q_proj"], use_dora=True)
    edit_config(path, use_dora=False)
    with pytest.raises(AdapterError, match="DoRA magnitude in the file but use_dora is false"):
        load_loras(copy.deepcopy(base), {"d": str(path)})


def test_changed_base_embedding_is_refused(tmp_path):
    """PEFT saves the base embedding with embedding LoRA; one from a different base must not be served."""
    base = tiny_model("llama")
    path = make_kind_adapter(base, tmp_path / "e", 0, r=2, target_modules=["embed_tokens"])
    other = tiny_model("llama", seed=1)
    with pytest.raises(AdapterError, match="base layer weight .* differs"):
        load_loras(other, {"e": str(path)})
