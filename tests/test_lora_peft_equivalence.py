"""A mixed batch (base rows + many differently configured adapters) gives, row by row, what PEFT gives.

Every architecture gets one tiny random model, five PEFT adapters with non-zero A and B and different
r / lora_alpha / targets / rsLoRA / rank_pattern / alpha_pattern / layers_to_transform (+ layers_pattern) /
exclude_modules / regex target_modules / "all-linear", all built once per module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from peft import PeftModel

from blora import kernels, load_loras, prepare_batch
from blora.lora import backends
from blora.lora.manager import LoraManager
from tests.helpers import ARCHS, make_adapter, targets, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

REL_TOL = 1e-4  # fp32, relative to the largest reference logit
NEW_TOKENS = 6
LONG = (
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the dark forest "
    "where nobody will ever be able to find it again, not even the hunters."
)
# (prompt, adapter key or None for the base model); prompts of very different lengths, adapters repeated.
ROWS = [
    ("Hi", None),
    (LONG, "attn_l0"),
    ("Once upon a time", "mlp_rslora"),
    ("x", "all_linear"),
    ("What is the capital of France?", "regex"),
    (LONG, None),
    ("The weather today is", "layer1"),
    ("Hi", "attn_l0"),
]


def adapter_specs(arch: str) -> dict[str, dict]:
    """PEFT LoraConfig kwargs per adapter key: every config field that changes the math appears."""
    gpt2 = arch == "gpt2"
    layers = "h" if gpt2 else "layers"
    return {
        "attn_l0": dict(
            r=4,
            lora_alpha=8,
            target_modules=targets(arch, "attn"),
            layers_to_transform=[0],
            layers_pattern=layers,
        ),
        "mlp_rslora": dict(
            r=8,
            lora_alpha=4,
            use_rslora=True,
            target_modules=targets(arch, "mlp"),
            exclude_modules=["h.1.mlp.c_proj" if gpt2 else "layers.1.mlp.down_proj"],
        ),
        "all_linear": dict(
            r=2,
            lora_alpha=16,
            target_modules="all-linear",
            rank_pattern={rf"{layers}\.0\..*": 6},
            alpha_pattern={"attn.c_proj" if gpt2 else "o_proj": 32},
        ),
        "regex": dict(
            r=3,
            lora_alpha=5,
            target_modules=r".*\.h\.\d+\.(attn\.c_proj|mlp\.c_fc)"
            if gpt2
            else r".*\.(k_proj|up_proj|o_proj)",
            exclude_modules=r".*\.h\.0\.mlp\.c_fc" if gpt2 else r".*\.0\.self_attn\.k_proj",
            rank_pattern={"c_fc" if gpt2 else "up_proj": 7},
        ),
        "layer1": dict(r=5, lora_alpha=7, target_modules=targets(arch, "all"), layers_to_transform=1),
    }


@dataclass
class RowRef:
    ids: torch.Tensor  # [1, n] the row's prompt alone, unpadded
    logits: torch.Tensor  # [n, V] PEFT (or base) logits for the row alone
    gen_tokens: list[int]  # PEFT (or base) greedy continuation of the row alone
    gen_scores: list[torch.Tensor]  # [V] per generated step


@dataclass
class Case:
    arch: str
    base: torch.nn.Module
    model: torch.nn.Module
    lora_map: dict[str, int]
    dirs: dict[str, str]
    refs: list[RowRef] = field(default_factory=list)
    peft_models: dict[str, torch.nn.Module] = field(default_factory=dict)

    def rows(self, rows=ROWS) -> list[tuple[str, str | None]]:
        return [(p, None if k is None else self.dirs[k]) for p, k in rows]


def _generate(model, ids: torch.Tensor, pad_id: int) -> tuple[list[int], list[torch.Tensor]]:
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=pad_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, ids.shape[1] :].tolist(), [s[0] for s in out.scores]


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory, tok) -> Case:
    arch = request.param
    base = tiny_model(arch)
    root = tmp_path_factory.mktemp(f"peft_eq_{arch}")
    dirs = {
        key: str(make_adapter(base, root / key, seed, **kw))
        for seed, (key, kw) in enumerate(adapter_specs(arch).items(), start=1)
    }
    model, lora_map = load_loras(copy.deepcopy(base), list(dirs.values()))
    peft_models = {key: PeftModel.from_pretrained(copy.deepcopy(base), d).eval() for key, d in dirs.items()}
    result = Case(arch, base, model, lora_map, dirs, peft_models=peft_models)
    with torch.no_grad():
        for prompt, key in ROWS:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            ref_model = base if key is None else peft_models[key]
            logits = ref_model(input_ids=ids).logits[0]
            tokens, scores = _generate(ref_model, ids, tok.pad_token_id)
            result.refs.append(RowRef(ids, logits, tokens, scores))
    return result


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def use_backend(model, kernel: str, monkeypatch) -> None:
    """Library mode's LoRA through the compiled kernel ("cpu", where it builds) or the PyTorch ops."""
    manager = LoraManager.attach(model)
    name = "torch" if kernel == "torch_ops" or kernels.get() is None else "cpu"
    monkeypatch.setattr(
        manager, "backend", backends.create(name, backends.BackendOptions(torch.device("cpu")))
    )


def row_logits(model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each row's logits at its real (unpadded) positions."""
    with torch.no_grad():
        logits = model(**batch).logits
    mask = batch["attention_mask"].bool()
    return [logits[i][mask[i]] for i in range(logits.shape[0])]


@pytest.mark.parametrize("kernel", ["cpu_kernel", "torch_ops"])
def test_mixed_batch_rows_match_peft_alone(case, tok, kernel, monkeypatch):
    """Also covers ``model(**batch)`` with padded rows on GPT-2 (absolute positions). Both LoRA paths on
    CPU: the compiled kernel (where it builds) and the PyTorch ops."""
    use_backend(case.model, kernel, monkeypatch)
    batch = prepare_batch(case.rows(), tok, case.model, case.lora_map)
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # rows really are padded
    got = row_logits(case.model, batch)
    for i, ((prompt, key), ref) in enumerate(zip(ROWS, case.refs, strict=True)):
        assert got[i].shape == ref.logits.shape, (i, prompt)
        err = rel_err(got[i], ref.logits)
        assert err < REL_TOL, f"{case.arch} row {i} ({key or 'base'}, {prompt[:20]!r}): rel err {err:.2e}"


def test_base_rows_equal_base_model(case, tok):
    batch = prepare_batch(case.rows(), tok, case.model, case.lora_map)
    got = row_logits(case.model, batch)
    for i, (_, key) in enumerate(ROWS):
        if key is None:
            with torch.no_grad():
                base = case.base(input_ids=case.refs[i].ids).logits[0]
            assert rel_err(got[i], base) < 1e-5, f"{case.arch} base row {i}"


def test_lora_is_not_a_no_op(case, tok):
    """Would fail if the adapters did nothing: same prompt, every adapter differs from base and from each other."""
    prompt = "Tell me a story about a dragon"
    keys = list(case.dirs)
    batch = prepare_batch(
        [(prompt, None)] + [(prompt, case.dirs[k]) for k in keys], tok, case.model, case.lora_map
    )
    with torch.no_grad():
        logits = case.model(**batch).logits[:, -1]
    scale = logits[0].abs().max()
    for j, key in enumerate(keys, start=1):
        diff = (logits[j] - logits[0]).abs().max() / scale
        assert diff > 0.02, f"{case.arch} adapter {key} barely changes the logits ({diff:.2e})"
        for m in range(j + 1, len(keys) + 1):
            assert (logits[j] - logits[m]).abs().max() / scale > 0.02, (key, keys[m - 1])
    # The PEFT references themselves are not the base model either (guards the oracle, non-zero B).
    for (_, key), ref in zip(ROWS, case.refs, strict=True):
        if key is not None:
            with torch.no_grad():
                base = case.base(input_ids=ref.ids).logits[0]
            assert rel_err(ref.logits, base) > 0.02, key


def assert_same_greedy(got: list[int], ref: RowRef, what: str) -> None:
    """Equal greedy tokens; a divergence is tolerated only at a genuine near-tie of the reference logits."""
    for step, (g, r) in enumerate(zip(got, ref.gen_tokens, strict=False)):
        if g != r:
            top2 = ref.gen_scores[step].topk(2).values
            gap = (top2[0] - top2[1]).item()
            assert gap < 1e-4 * top2.abs().max().item(), (
                f"{what}: step {step} got {g}, PEFT {r} (gap {gap:.2e})"
            )
            return
    assert len(ref.gen_tokens) <= len(got), what


@pytest.mark.parametrize("kernel", ["cpu_kernel", "torch_ops"])
def test_greedy_generate_matches_peft_alone(case, tok, kernel, monkeypatch):
    use_backend(case.model, kernel, monkeypatch)
    batch = prepare_batch(case.rows(), tok, case.model, case.lora_map)
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = case.model.generate(
            **batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
        )
    assert out.shape[0] == len(ROWS)
    for i, ((prompt, key), ref) in enumerate(zip(ROWS, case.refs, strict=True)):
        assert torch.equal(out[i, :width], batch["input_ids"][i])
        assert_same_greedy(
            out[i, width:].tolist(), ref, f"{case.arch} row {i} ({key or 'base'}, {prompt[:20]!r})"
        )


def test_beam_search_rows_match_peft_alone(case, tok):
    """``generate`` repeats each row per beam; the repeated rows must keep their row's adapter."""
    rows = [ROWS[i] for i in (1, 0, 2, 3)]
    batch = prepare_batch(case.rows(rows), tok, case.model, case.lora_map)
    kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        out = case.model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
        for i, (prompt, key) in enumerate(rows):
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            ref_model = case.base if key is None else case.peft_models[key]
            ref = ref_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[
                0, ids.shape[1] :
            ]
            assert out[i, : ref.numel()].tolist() == ref.tolist(), (
                f"{case.arch} beam row {i} ({key or 'base'})"
            )


def test_padding_side_row_order_and_lengths_do_not_matter(case, tok_copy):
    rows = case.rows()
    tok_copy.padding_side = "left"
    left = prepare_batch(rows, tok_copy, case.model, case.lora_map)
    tok_copy.padding_side = "right"
    right = prepare_batch(rows, tok_copy, case.model, case.lora_map)
    for k in left:
        assert torch.equal(left[k], right[k]), k
    mixed = row_logits(case.model, right)
    # Reversed order: every row keeps its logits.
    reversed_logits = row_logits(case.model, prepare_batch(rows[::-1], tok_copy, case.model, case.lora_map))[
        ::-1
    ]
    # Short rows with only short neighbours (little padding) vs. next to the long prompt (much padding).
    short = [i for i, (p, _) in enumerate(ROWS) if p != LONG]
    short_only = row_logits(
        case.model, prepare_batch([rows[i] for i in short], tok_copy, case.model, case.lora_map)
    )
    alone = {
        i: row_logits(case.model, prepare_batch([rows[i]], tok_copy, case.model, case.lora_map))[0]
        for i in (0, 3)
    }
    for i, got in enumerate(mixed):
        assert rel_err(reversed_logits[i], got) < 1e-5, f"{case.arch} row {i} reversed"
    for j, i in enumerate(short):
        assert rel_err(short_only[j], mixed[i]) < 1e-5, f"{case.arch} row {i} without the long prompts"
    for i, got in alone.items():
        assert rel_err(got, mixed[i]) < 1e-5, f"{case.arch} row {i} alone"


def _tokenizer_state(tokenizer) -> dict:
    return {
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "special": dict(tokenizer.special_tokens_map),
        "len": len(tokenizer),
    }


@pytest.mark.parametrize("pad", ["none", "eos", "other"])
def test_prepare_batch_with_or_without_pad_token(case, tok_copy, pad):
    """Works whether or not the tokenizer has a pad token, does not modify it, and the pad id is irrelevant."""
    if pad == "none":
        tok_copy.pad_token = None
        assert tok_copy.pad_token_id is None
    elif pad == "other":
        tok_copy.pad_token = "<|endoftext|>"
        tok_copy.padding_side = "left"
    before = _tokenizer_state(tok_copy)
    batch = prepare_batch(case.rows(), tok_copy, case.model, case.lora_map)
    assert _tokenizer_state(tok_copy) == before
    assert set(batch) >= {"input_ids", "attention_mask", "adapter_ids"}
    for i, got in enumerate(row_logits(case.model, batch)):
        assert rel_err(got, case.refs[i].logits) < REL_TOL, f"{case.arch} row {i} pad={pad}"
