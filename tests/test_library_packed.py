"""Library mode with prepacked base weights (``load_loras(packed_weights=True)``, ``LoraLinear.pack``).

The wrapped layers' base GEMM runs on a oneDNN-prepacked copy of the weight: mixed batches must still match
PEFT running each adapter alone, base rows the base model, and ``packed_weights=False`` must be today's
path exactly (no copy held).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from blora import load_loras, prepare_batch
from blora.library import unload_loras
from blora.lora.layers import LoraLinear
from blora.lora.manager import LoraManager
from blora.models.families.packing import Packed
from tests.helpers import make_adapter, targets, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

REL_TOL = 1e-4  # LoRA rows vs PEFT, as in test_lora_peft_equivalence (fp32)
# fp32 base rows vs the base model: oneDNN's packed GEMM sums in another order than F.linear (~1e-6 apart)
BASE_REL_TOL = 1e-5
BF16_REL_TOL = 3e-2  # bfloat16 LoRA rows vs PEFT in bfloat16 (8-bit mantissa; LoRA adds in another order)
ROWS = [
    ("Hi", None),
    ("The quick brown fox jumps over the lazy dog", "attn"),
    ("Once upon a time", "mlp"),
    ("What is the capital of France?", "all"),
    ("The weather today is", None),
    ("x", "attn"),
]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def make_dirs(base, root: Path) -> dict[str, str]:
    specs = {
        "attn": dict(r=4, lora_alpha=8, target_modules=targets("llama", "attn")),
        "mlp": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=targets("llama", "mlp")),
        "all": dict(r=2, lora_alpha=16, target_modules="all-linear"),
    }
    return {
        key: str(make_adapter(base, root / key, seed, **kw))
        for seed, (key, kw) in enumerate(specs.items(), start=1)
    }


def wrappers(model) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def packed_of(w: LoraLinear) -> torch.Tensor | None:
    """The prepacked weight ``w``'s base GEMM runs on: its group's (q/k/v, gate/up) or its own."""
    return w.shared.packed if w.shared is not None else w.packed


def row_logits(model, rows, dirs, tok, lora_map) -> list[torch.Tensor]:
    batch = prepare_batch([(p, None if k is None else dirs[k]) for p, k in rows], tok, model, lora_map)
    with torch.no_grad():
        logits = model(**batch).logits
    mask = batch["attention_mask"].bool()
    return [logits[i][mask[i]] for i in range(logits.shape[0])]


def references(base, dirs, tok) -> list[torch.Tensor]:
    """Each row alone: PEFT with its adapter, or the base model."""
    peft = {k: PeftModel.from_pretrained(copy.deepcopy(base), d).eval() for k, d in dirs.items()}
    out = []
    with torch.no_grad():
        for prompt, key in ROWS:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            out.append((base if key is None else peft[key])(input_ids=ids).logits[0])
    return out


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, tok):
    base = tiny_model("llama")
    dirs = make_dirs(base, tmp_path_factory.mktemp("packed_fp32"))
    return base, dirs, references(base, dirs, tok)


def test_packed_rows_match_peft_and_base(fp32, tok):
    base, dirs, refs = fp32
    model, lora_map = load_loras(copy.deepcopy(base), list(dirs.values()))
    held = wrappers(model)
    assert held and all(w.pack_base and packed_of(w) is not None for w in held), "library mode did not pack"
    assert all(packed_of(w) is not w.base.weight and w.base.weight.layout == torch.strided for w in held)
    assert any(w.shared is not None for w in held), "no q/k/v or gate/up group"
    got = row_logits(model, ROWS, dirs, tok, lora_map)
    for i, ((_, key), ref) in enumerate(zip(ROWS, refs, strict=True)):
        err = rel_err(got[i], ref)
        assert err < (BASE_REL_TOL if key is None else REL_TOL), f"row {i} ({key or 'base'}): {err:.2e}"


def test_packed_path_is_taken(fp32, tok, monkeypatch):
    """The packed GEMM really runs: a wrong packed copy changes the outputs (guards the tests above)."""
    base, dirs, _ = fp32
    model, lora_map = load_loras(copy.deepcopy(base), list(dirs.values()))
    before = row_logits(model, ROWS, dirs, tok, lora_map)
    for w in wrappers(model):
        if w.shared is not None:
            w.shared.packed = Packed.of(torch.zeros(sum(w.shared.widths), w.in_features))
        else:
            w.packed = Packed.of(torch.zeros_like(w.base.weight))
    after = row_logits(model, ROWS, dirs, tok, lora_map)
    assert all(rel_err(a, b) > 1e-2 for a, b in zip(after, before, strict=True))


def test_unpacked_is_todays_path(fp32, tok):
    """``packed_weights=False``: no copy, bit-identical to the layers running ``F.linear`` themselves."""
    base, dirs, refs = fp32
    model, lora_map = load_loras(copy.deepcopy(base), list(dirs.values()), packed_weights=False)
    assert all(not w.pack_base and w.packed is None for w in wrappers(model))
    got = row_logits(model, ROWS, dirs, tok, lora_map)
    batch = prepare_batch([(p, None) for p, _ in ROWS], tok, model, lora_map)
    batch.pop("adapter_ids")
    mask = batch["attention_mask"].bool()
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as library mode counts them
    with torch.no_grad():  # the same padded batch through the model's own layers
        plain = base(**batch, position_ids=positions).logits
    for i, (_, key) in enumerate(ROWS):
        if key is None:
            assert torch.equal(got[i], plain[i][mask[i]]), f"base row {i}"
        else:
            assert rel_err(got[i], refs[i]) < REL_TOL, i
    # switching it on for the same model packs the existing wrappers
    load_loras(model, {}, packed_weights=True)
    assert all(packed_of(w) is not None for w in wrappers(model))
    load_loras(model, {}, packed_weights=False)
    assert all(w.packed is None and w.shared is None for w in wrappers(model))
    assert all(
        torch.equal(a, b) for a, b in zip(row_logits(model, ROWS, dirs, tok, lora_map), got, strict=True)
    )


def test_unload_frees_and_later_loads_pack(fp32, tok):
    base, dirs, refs = fp32
    model, lora_map = load_loras(copy.deepcopy(base), [dirs["attn"]])
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear) and packed_of(q) is not None
    model, lora_map = load_loras(model, [dirs["mlp"], dirs["all"]])  # wrappers added later are packed too
    assert all(packed_of(w) is not None for w in wrappers(model))
    got = row_logits(model, ROWS, dirs, tok, lora_map)
    assert all(rel_err(g, r) < REL_TOL for g, r in zip(got, refs, strict=True))
    unload_loras(model, [dirs["all"], dirs["mlp"]])
    # q_proj keeps "attn"'s adapter (and its copy); layers with no adapter left hold none
    assert all((packed_of(w) is not None) == bool(w.pairs) for w in wrappers(model))
    assert any(packed_of(w) is None for w in wrappers(model)) and packed_of(q) is not None
    unload_loras(model, [dirs["attn"]])
    assert all(w.packed is None and w.shared is None and not w.pack_base for w in wrappers(model))
    manager = LoraManager.attach(model)
    assert manager.packed_weights  # the setting stays: a later load packs again
    model, lora_map = load_loras(model, [dirs["attn"]])
    assert packed_of(q) is not None


def test_deepcopy_and_weight_change_repack(fp32, tok):
    """An opaque oneDNN tensor cannot be deep-copied: the copy re-packs its own weight on first use; an
    in-place change of the base weight is seen too."""
    base, dirs, refs = fp32
    model, lora_map = load_loras(copy.deepcopy(base), list(dirs.values()))
    clone = copy.deepcopy(model)
    got = row_logits(clone, ROWS, dirs, tok, lora_map)
    assert all(packed_of(w) is not None for w in wrappers(clone))
    assert all(
        rel_err(g, r) < (REL_TOL if k else BASE_REL_TOL) for g, r, (_, k) in zip(got, refs, ROWS, strict=True)
    )
    q = clone.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.base.weight.mul_(2)
        x = torch.randn(3, 4, q.in_features)
        assert rel_err(q(x), torch.nn.functional.linear(x, q.base.weight, q.base.bias)) < 1e-6


def test_grad_mode_uses_autograd_path(fp32):
    """Outside ``no_grad`` the base GEMM runs through ``nn.Linear`` (the packed op has no backward)."""
    base, dirs, _ = fp32
    model, _ = load_loras(copy.deepcopy(base), [dirs["attn"]])
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, q.in_features, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and q.base.weight.grad is not None


def test_bfloat16(tmp_path_factory, tok):
    base = tiny_model("llama", dtype=torch.bfloat16)
    dirs = make_dirs(base, tmp_path_factory.mktemp("packed_bf16"))
    refs = references(base, dirs, tok)
    model, lora_map = load_loras(copy.deepcopy(base), list(dirs.values()))
    assert all((p := packed_of(w)) is not None and p.dtype == torch.bfloat16 for w in wrappers(model))
    got = row_logits(model, ROWS, dirs, tok, lora_map)
    plain, plain_map = load_loras(copy.deepcopy(base), list(dirs.values()), packed_weights=False)
    unpacked = row_logits(plain, ROWS, dirs, tok, plain_map)
    for i, ((_, key), ref) in enumerate(zip(ROWS, refs, strict=True)):
        if key is None:
            assert torch.equal(got[i], ref), f"bf16 base row {i}: packed GEMM gave other bits"
        else:
            assert rel_err(got[i], ref) < BF16_REL_TOL, f"bf16 row {i} ({key})"
            assert torch.equal(got[i], unpacked[i]), f"bf16 row {i} ({key}): packed vs F.linear"
