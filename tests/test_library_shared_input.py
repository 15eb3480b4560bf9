"""Library mode's shared-input groups (``blora.lora.layers.SharedInput``): q/k/v (and gate/up) computed
together by the first of them called on an input, the others' results kept for their calls on that input.

A kept result must never reach a call on another input, an input changed in place since, another
``lora_batch`` or changed adapter weights: each call below is checked against the same layer computed
without groups (``packed_weights=False``: ``F.linear`` plus the LoRA, one projection at a time).
"""

from __future__ import annotations

import copy

import pytest
import torch

from blora import load_loras, prepare_batch
from blora.lora.context import lora_batch
from blora.lora.layers import LoraLinear, SharedInput
from tests.helpers import make_adapter, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # fp32: the packed / fused GEMM sums in another order than F.linear


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(grouped model, ungrouped reference model): the same tiny llama with two all-linear adapters."""
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("shared_input")
    dirs = [str(make_adapter(base, root / f"a{i}", i, r=4, target_modules="all-linear")) for i in (1, 2)]
    grouped, lora_map = load_loras(copy.deepcopy(base), dirs)
    plain, plain_map = load_loras(copy.deepcopy(base), dirs, packed_weights=False)
    assert lora_map == plain_map
    return grouped, plain


def attn(model):
    return model.model.layers[0].self_attn


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def check(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert rel_err(got, ref) < TOL, f"{what}: {rel_err(got, ref):.2e}"


def test_grouped(models):
    grouped, plain = models
    a = attn(grouped)
    assert a.q_proj.shared is not None and a.q_proj.shared is a.k_proj.shared is a.v_proj.shared
    mlp = grouped.model.layers[0].mlp
    assert mlp.gate_proj.shared is mlp.up_proj.shared is not None and mlp.down_proj.shared is None
    assert a.o_proj.shared is None and all(
        m.shared is None for m in plain.modules() if isinstance(m, LoraLinear)
    )


def test_other_input_order_and_repeats(models):
    """Different inputs, another call order and repeated calls each get their own projection's result."""
    grouped, plain = models
    g, p = attn(grouped), attn(plain)
    slots = torch.tensor([0, -1, 1])
    x1, x2 = torch.randn(3, 2, g.q_proj.in_features), torch.randn(3, 2, g.q_proj.in_features)
    calls = [("q", x1), ("k", x2), ("v", x1), ("k", x1), ("k", x1), ("v", x1), ("q", x1), ("v", x2)]
    with torch.no_grad(), lora_batch(slots, per_row=True):
        for name, x in calls:
            got = getattr(g, f"{name}_proj")(x)
            check(got, getattr(p, f"{name}_proj")(x), f"{name}_proj")


def test_input_changed_in_place(models):
    grouped, plain = models
    g, p = attn(grouped), attn(plain)
    x = torch.randn(2, 3, g.q_proj.in_features)
    with torch.no_grad(), lora_batch(torch.tensor([1, 0]), per_row=True):
        g.q_proj(x)
        x.mul_(-2)  # k and v must not get results made from x before this
        check(g.k_proj(x), p.k_proj(x), "k_proj after in-place change")
        check(g.v_proj(x), p.v_proj(x), "v_proj after in-place change")


def test_other_batch_and_no_batch(models):
    """A result kept under one ``lora_batch`` is not handed to a call under another (or under none)."""
    grouped, plain = models
    g, p = attn(grouped), attn(plain)
    x = torch.randn(2, 1, g.q_proj.in_features)
    with torch.no_grad():
        with lora_batch(torch.tensor([0, 0]), per_row=True):
            g.q_proj(x)
        with lora_batch(torch.tensor([1, -1]), per_row=True):
            check(g.k_proj(x), p.k_proj(x), "k_proj in the next batch")
            g.q_proj(x)
        check(g.v_proj(x), p.v_proj(x), "v_proj outside any batch")


def test_weights_changed_between_calls(models):
    grouped, _ = models
    g = attn(copy.deepcopy(grouped))
    x = torch.randn(2, 1, g.q_proj.in_features)
    with torch.no_grad(), lora_batch(torch.tensor([0, 1]), per_row=True):
        g.q_proj(x)
        a_t, b_t = g.k_proj.pairs[0]
        g.k_proj.set_lora(0, a_t, b_t * 3)
        got = g.k_proj(x)
        check(got, g.k_proj(x.clone()), "k_proj after set_lora")  # a fresh input: computed now


def test_hooks_changing_inputs_match_ungrouped(models, tok):
    """Whole model with a pre-hook that hands k_proj another input than q_proj's, and the mixed batch."""
    grouped, plain = models
    grouped, plain = copy.deepcopy(grouped), copy.deepcopy(plain)
    for model in (grouped, plain):
        for layer in model.model.layers:
            layer.self_attn.k_proj.register_forward_pre_hook(lambda _m, args: (args[0] * 0.5,))
    rows = [("Hello there", 0), ("The quick brown fox", -1), ("Once upon", 1)]
    batch = prepare_batch([(t, None) for t, _ in rows], tok, grouped, {})
    batch["adapter_ids"] = torch.tensor([s for _, s in rows])
    with torch.no_grad():
        got = grouped(**batch).logits
        ref = plain(**batch).logits
        no_hook = copy.deepcopy(grouped)
        for layer in no_hook.model.layers:
            layer.self_attn.k_proj._forward_pre_hooks.clear()
        other = no_hook(**batch).logits
    check(got, ref, "logits with a k_proj input hook")
    assert rel_err(other, ref) > 1e-3  # the hook matters: the check above can fail


def test_inference_mode_falls_back(models):
    """An inference-mode tensor has no version counter: each projection runs on its own."""
    grouped, plain = models
    g, p = attn(grouped), attn(plain)
    with torch.inference_mode(), lora_batch(torch.tensor([0, 1]), per_row=True):
        x = torch.randn(2, 2, g.q_proj.in_features)
        for name in ("q", "k", "v", "k"):
            check(getattr(g, f"{name}_proj")(x), getattr(p, f"{name}_proj")(x), f"{name}_proj")


def test_biases_and_their_changes(tmp_path, tok):
    """Qwen2's q/k/v biases go into the fused GEMM; an in-place change of one is seen at the next call."""
    base = tiny_model("qwen2")
    path = str(make_adapter(base, tmp_path / "a", 3, r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    grouped, lora_map = load_loras(copy.deepcopy(base), [path])
    plain, _ = load_loras(copy.deepcopy(base), [path], packed_weights=False)
    assert attn(grouped).q_proj.shared is not None and attn(grouped).q_proj.shared.bias is not None
    batch = prepare_batch([("Hello there", path), ("Once upon a time", None)], tok, grouped, lora_map)
    for step in range(2):
        with torch.no_grad():
            check(grouped(**batch).logits, plain(**batch).logits, f"logits, step {step}")
            for model in (grouped, plain):
                attn(model).k_proj.base.bias.mul_(3)


def test_generate_takes_the_shared_path(models, tok, monkeypatch):
    """``generate`` (no_grad, not inference mode) hands q/k/v results out from the shared GEMM; the tokens
    match the ungrouped model's."""
    grouped, plain = models
    handed = []
    output = SharedInput.output

    def counting(self, member, x):
        out = output(self, member, x)
        handed.append(out is not None)
        return out

    monkeypatch.setattr(SharedInput, "output", counting)
    batch = prepare_batch([("Hello there", None), ("Once upon a time", None)], tok, grouped, {})
    batch["adapter_ids"] = torch.tensor([0, 1])
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = grouped.generate(**batch, **gen)
    assert handed and all(handed), "a shared-input call fell back to the per-layer path"
    assert torch.equal(got, plain.generate(**batch, **gen))
