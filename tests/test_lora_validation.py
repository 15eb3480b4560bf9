"""Every adapter validation error is clear (names adapter, file, key), and a failed load changes nothing.

Also: legacy ``adapter_model.bin`` (weights_only), hub ids from the local cache only, unloading and
loading after injection.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blora import load_loras, prepare_batch
from blora.library import unload_loras
from blora.lora import AdapterError
from blora.lora.manager import LoraManager
from tests.helpers import make_adapter, peft_logits, tiny_config, tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "llama"
PROMPTS = ["Hello there, how are you doing today?", "Hi"]
ST = "adapter_model.safetensors"
CFG = "adapter_config.json"


class Env:
    """Module-wide: one tiny base model, adapters made with PEFT, PEFT reference logits."""

    def __init__(self, root: Path) -> None:
        self.base = tiny_model(ARCH)
        self.good = make_adapter(
            self.base, root / "good", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        )
        self.mlp = make_adapter(
            self.base, root / "mlp", 2, r=6, lora_alpha=3, target_modules=["gate_proj", "down_proj"]
        )
        self.third = make_adapter(
            self.base, root / "third", 3, r=2, lora_alpha=16, target_modules="all-linear"
        )
        self.ids = tokenizer()(PROMPTS[0], return_tensors="pt")["input_ids"]
        self.ref = {name: peft_logits(self.base, path, self.ids)[0] for name, path in self.adapters().items()}
        self.ref[None] = peft_logits(self.base, None, self.ids)[0]

    def adapters(self) -> dict[str, Path]:
        return {"good": self.good, "mlp": self.mlp, "third": self.third}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("validation"))


@pytest.fixture
def loaded(env):
    """A fresh copy of the base model with adapter 'good' already loaded."""
    model, lora_map = load_loras(copy.deepcopy(env.base), {"good": str(env.good)})
    assert lora_map == {"good": 0}
    return model


def lora_map_of(model) -> dict[str, int]:
    return {name: info.slot for name, info in LoraManager.attach(model).adapters.items()}


def logits_for(model, adapter: str | None, ids: torch.Tensor) -> torch.Tensor:
    slot = -1 if adapter is None else lora_map_of(model)[adapter]
    with torch.no_grad():
        return model(input_ids=ids, adapter_ids=torch.tensor([slot])).logits[0]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def snapshot(model, env: Env) -> dict:
    with torch.no_grad():
        batch = prepare_batch(
            [(PROMPTS[0], name) for name in [*lora_map_of(model), None]] + [(PROMPTS[1], None)],
            tokenizer(),
            model,
            lora_map_of(model),
        )
        logits = model(**batch).logits
    return {
        "logits": logits,
        "lora_map": lora_map_of(model),
        "modules": [(name, type(m).__name__) for name, m in model.named_modules()],
        "state_keys": list(model.state_dict()),
        "max_rank": LoraManager.attach(model).max_rank,
    }


def assert_unchanged(before: dict, after: dict) -> None:
    assert after["lora_map"] == before["lora_map"], "a failed load changed the loaded adapters"
    assert after["modules"] == before["modules"], "a failed load changed the module structure"
    assert after["state_keys"] == before["state_keys"], "a failed load changed the state_dict keys"
    assert after["max_rank"] == before["max_rank"], "a failed load changed the configured max_rank"
    assert torch.equal(after["logits"], before["logits"]), "a failed load changed the model's outputs"


def assert_refused(model, env, adapters, *patterns: str, exc=AdapterError, **kwargs) -> str:
    """``load_loras`` fails with ``exc`` whose message matches every pattern; nothing changes. Returns the message."""
    before = snapshot(model, env)
    with pytest.raises(exc) as info:
        load_loras(model, adapters, **kwargs)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in error message: {message}"
    assert_unchanged(before, snapshot(model, env))
    # The adapter already loaded still gives PEFT's logits.
    assert rel_err(logits_for(model, "good", env.ids), env.ref["good"]) < 1e-4
    return message


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> Path:
    cfg = json.loads((path / CFG).read_text())
    cfg.update(changes)
    (path / CFG).write_text(json.dumps(cfg))
    return path


def edit_weights(path: Path, fn) -> Path:
    tensors = load_file(str(path / ST))
    save_file(fn(tensors), str(path / ST))
    return path


# ------------------------------------------------------------------------------------------ files and formats


def test_missing_directory(loaded, env, tmp_path):
    missing = tmp_path / "no_such_adapter"
    assert_refused(loaded, env, {"ghost": str(missing)}, "'ghost'", re.escape(str(missing)), "does not exist")
    assert_refused(loaded, env, [str(missing)], re.escape(str(missing)), "does not exist")


def test_path_is_a_file(loaded, env, tmp_path):
    assert_refused(loaded, env, {"f": str(env.good / CFG)}, "'f'", "is a file", "directory")


def test_missing_adapter_config(loaded, env, tmp_path):
    path = copy_adapter(env.good, tmp_path / "a")
    (path / CFG).unlink()
    assert_refused(loaded, env, {"nocfg": str(path)}, "'nocfg'", CFG, "does not exist")


@pytest.mark.parametrize("text, pattern", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_json(loaded, env, tmp_path, text, pattern):
    path = copy_adapter(env.good, tmp_path / "a")
    (path / CFG).write_text(text)
    assert_refused(loaded, env, {"badjson": str(path)}, "'badjson'", CFG, pattern)


def test_missing_weights_file(loaded, env, tmp_path):
    path = copy_adapter(env.good, tmp_path / "a")
    (path / ST).unlink()
    assert_refused(loaded, env, {"now": str(path)}, "'now'", ST, "adapter_model.bin")


def test_damaged_weights_file(loaded, env, tmp_path):
    path = copy_adapter(env.good, tmp_path / "a")
    (path / ST).write_bytes(b"\x00\x01garbage" * 10)
    assert_refused(loaded, env, {"dmg": str(path)}, "'dmg'", ST, "cannot read")


def test_weights_file_without_lora_keys(loaded, env, tmp_path):
    path = edit_weights(copy_adapter(env.good, tmp_path / "a"), lambda t: {})
    assert_refused(loaded, env, {"empty": str(path)}, "'empty'", "no lora_A/lora_B")


def test_lora_b_missing_for_a_module(loaded, env, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def drop(t):
        assert key in t
        return {k: v for k, v in t.items() if k != key}

    path = edit_weights(copy_adapter(env.good, tmp_path / "a"), drop)
    assert_refused(loaded, env, {"half": str(path)}, "'half'", "layers.1.self_attn.v_proj", "lora_B")


# -------------------------------------------------------------------------------------- adapter vs base model


def test_weights_for_a_module_missing_from_the_base_model(loaded, env, tmp_path):
    """Must fail, not quietly run the base model for that module."""

    def to_layer_9(t):
        return {k.replace("layers.2.", "layers.9."): v for k, v in t.items()}

    path = edit_weights(copy_adapter(env.good, tmp_path / "a"), to_layer_9)
    assert_refused(
        loaded,
        env,
        {"l9": str(path)},
        "'l9'",
        re.escape("model.layers.9.self_attn."),
        "does not exist in the base",
    )


def test_adapter_for_another_architecture(loaded, env, tmp_path):
    gpt2 = tiny_model("gpt2")
    path = make_adapter(gpt2, tmp_path / "gpt2", 5, r=4, lora_alpha=8, target_modules=["c_attn"])
    assert_refused(
        loaded, env, {"gpt2": str(path)}, "'gpt2'", "transformer.h.0.attn.c_attn", "does not exist"
    )


def test_weights_for_a_module_the_config_does_not_target(loaded, env, tmp_path):
    path = edit_config(copy_adapter(env.good, tmp_path / "a"), target_modules=["q_proj"])
    assert_refused(loaded, env, {"untargeted": str(path)}, "'untargeted'", "v_proj", "do not select")


def test_shape_mismatch_adapter_for_another_base(loaded, env, tmp_path):
    cfg = tiny_config(ARCH, len(tokenizer()))
    cfg.hidden_size, cfg.intermediate_size = 32, 48
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(cfg).eval()
    path = make_adapter(other, tmp_path / "small", 6, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert_refused(
        loaded, env, {"small": str(path)}, "'small'", r"self_attn\.(q|v)_proj", "different base model"
    )


def test_rank_in_weights_differs_from_config(loaded, env, tmp_path):
    path = edit_config(copy_adapter(env.good, tmp_path / "a"), r=2)
    assert_refused(loaded, env, {"r2": str(path)}, "'r2'", "rank 4", "r=2")


# -------------------------------------------------------------------------------------------- config values


@pytest.mark.parametrize("r", [0, -4, 2.5, "4", True])
def test_r_must_be_a_positive_integer(loaded, env, tmp_path, r):
    path = edit_config(copy_adapter(env.good, tmp_path / "a"), r=r)
    assert_refused(loaded, env, {"badr": str(path)}, "'badr'", CFG, "r must be a positive integer")


def test_rank_pattern_must_be_positive(loaded, env, tmp_path):
    path = edit_config(copy_adapter(env.good, tmp_path / "a"), rank_pattern={"q_proj": 0})
    assert_refused(loaded, env, {"rp": str(path)}, "'rp'", "rank_pattern", "q_proj")


@pytest.mark.parametrize("alpha", ["8", None, [1]])
def test_lora_alpha_must_be_a_number(loaded, env, tmp_path, alpha):
    path = edit_config(copy_adapter(env.good, tmp_path / "a"), lora_alpha=alpha)
    assert_refused(loaded, env, {"alpha": str(path)}, "'alpha'", "lora_alpha")


@pytest.mark.parametrize(
    "kind, value", [("lora_A", float("nan")), ("lora_B", float("inf")), ("lora_B", -float("inf"))]
)
def test_nan_or_inf_weights(loaded, env, tmp_path, kind, value):
    key = f"base_model.model.model.layers.1.self_attn.q_proj.{kind}.weight"

    def poison(t):
        t[key] = t[key].clone()
        t[key][0, 0] = value
        return t

    path = edit_weights(copy_adapter(env.good, tmp_path / "a"), poison)
    assert_refused(loaded, env, {"nan": str(path)}, "'nan'", "layers.1.self_attn.q_proj", kind, "NaN or Inf")


def test_rank_above_max_rank(env):
    model = copy.deepcopy(env.base)
    msg = assert_refused_fresh(model, env, {"big": str(env.good)}, max_rank=2)
    assert "'big'" in msg and "rank 4" in msg and "maximum 2" in msg
    _, lora_map = load_loras(model, {"ok": str(env.good)}, max_rank=4)
    assert lora_map == {"ok": 0}


def assert_refused_fresh(model, env, adapters, **kwargs) -> str:
    """Like ``assert_refused`` for a model with no adapter yet: the model must stay a plain base model."""
    ids = env.ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    with pytest.raises(AdapterError) as info:
        load_loras(model, adapters, **kwargs)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules
    assert lora_map_of(model) == {}
    return str(info.value)


def test_bad_adapter_on_a_fresh_model_leaves_a_plain_model(env, tmp_path):
    path = edit_config(copy_adapter(env.good, tmp_path / "a"), r=0)
    msg = assert_refused_fresh(copy.deepcopy(env.base), env, {"fresh": str(path)})
    assert "'fresh'" in msg


# ----------------------------------------------------------------------------------------------- duplicates


def test_duplicate_names_in_one_call(loaded, env):
    msg = assert_refused(loaded, env, [str(env.mlp), str(env.mlp)], "duplicate", exc=ValueError)
    assert str(env.mlp) in msg


def test_duplicate_name_of_a_loaded_adapter(loaded, env):
    assert_refused(loaded, env, {"good": str(env.mlp)}, "'good'", "already loaded")
    assert_refused(loaded, env, {"good": str(env.good)}, "'good'", "already loaded")


def test_failure_after_a_good_adapter_in_the_same_call_rolls_back_everything(loaded, env, tmp_path):
    """'mlp' validates and installs (wrapping the MLP layers), then 'broken' fails: nothing may remain.

    Regression test (fixed): the rollback unloads 'mlp' but leaves the new LoraLinear wrappers around the MLP
    layers, so the module structure and state_dict keys change after a failed load_loras call.
    """
    broken = edit_config(copy_adapter(env.good, tmp_path / "b"), r=0)
    assert_refused(loaded, env, {"mlp": str(env.mlp), "broken": str(broken)}, "'broken'", "positive integer")
    assert "mlp" not in lora_map_of(loaded)


def test_failure_after_a_good_adapter_keeps_outputs_and_adapters(loaded, env, tmp_path):
    """The parts of the rollback that do work: outputs, lora_map and the loaded adapter's results."""
    broken = edit_config(copy_adapter(env.good, tmp_path / "b"), r=0)
    before = snapshot(loaded, env)
    with pytest.raises(AdapterError, match="'broken'"):
        load_loras(loaded, {"mlp": str(env.mlp), "broken": str(broken)})
    after = snapshot(loaded, env)
    assert after["lora_map"] == before["lora_map"] == {"good": 0}
    assert torch.equal(after["logits"], before["logits"])
    # and the name is free again
    _, lora_map = load_loras(loaded, {"mlp": str(env.mlp)})
    assert lora_map == {"good": 0, "mlp": 1}
    assert rel_err(logits_for(loaded, "mlp", env.ids), env.ref["mlp"]) < 1e-4


# ------------------------------------------------------------------------------------ unsupported features


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"use_qalora": True}, "QA-LoRA"),
        ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
        ({"init_lora_weights": "mica"}, "MiCA"),
        ({"bias": "all"}, "bias"),
        ({"bias": "lora_only"}, "bias"),
        ({"peft_type": "PREFIX_TUNING"}, "LoRA adapters only"),
    ],
)
def test_unsupported_config_features_are_refused(loaded, env, tmp_path, changes, pattern):
    path = edit_config(copy_adapter(env.good, tmp_path / "a"), **changes)
    assert_refused(loaded, env, {"unsup": str(path)}, "'unsup'", pattern, "not supported|only")


def test_dora_config_without_magnitudes_is_refused(loaded, env, tmp_path):
    path = edit_config(copy_adapter(env.good, tmp_path / "a"), use_dora=True)
    assert_refused(loaded, env, {"d": str(path)}, "'d'", "use_dora=true", "lora_magnitude_vector")


@pytest.mark.parametrize(
    "suffix, missing",
    [
        ("lora_embedding_A", "lora_B"),
        ("lora_embedding_B", "lora_A"),
        ("lora_magnitude_vector.weight", "lora_A"),
    ],
)
def test_incomplete_embedding_or_dora_weights_are_refused(loaded, env, tmp_path, suffix, missing):
    key = f"base_model.model.model.embed_tokens.{suffix}"

    def add(t):
        t[key] = torch.zeros(4, 8)
        return t

    path = edit_weights(copy_adapter(env.good, tmp_path / "a"), add)
    assert_refused(loaded, env, {"emb": str(path)}, "'emb'", "model.embed_tokens", f"no {missing} weight")


def test_unexpected_weight_key_is_refused(loaded, env, tmp_path):
    def add(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.something.weight"] = torch.zeros(2, 2)
        return t

    path = edit_weights(copy_adapter(env.good, tmp_path / "a"), add)
    assert_refused(loaded, env, {"odd": str(path)}, "'odd'", "something", "unexpected key")


# ----------------------------------------------------------------------------------------- legacy .bin files


def test_legacy_bin_loads_like_safetensors(loaded, env, tmp_path):
    path = copy_adapter(env.mlp, tmp_path / "legacy")
    torch.save(load_file(str(path / ST)), path / "adapter_model.bin")
    (path / ST).unlink()
    _, lora_map = load_loras(loaded, {"legacy": str(path)})
    assert lora_map == {"good": 0, "legacy": 1}
    assert rel_err(logits_for(loaded, "legacy", env.ids), env.ref["mlp"]) < 1e-4


class _Evil:
    """Unpickling this would run code (creates a marker file); weights_only loading must refuse it."""

    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_legacy_bin_with_pickled_objects_is_refused(loaded, env, tmp_path):
    path = copy_adapter(env.good, tmp_path / "evil")
    state = load_file(str(path / ST))
    evil = _Evil()
    evil.marker = str(tmp_path / "code_ran")
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = evil  # type: ignore[assignment]
    torch.save(state, path / "adapter_model.bin")
    (path / ST).unlink()
    assert_refused(loaded, env, {"evil": str(path)}, "'evil'", "adapter_model.bin", "weights_only")
    assert not (tmp_path / "code_ran").exists(), "loading the adapter ran pickled code"


def test_legacy_bin_that_is_not_a_state_dict(loaded, env, tmp_path):
    path = copy_adapter(env.good, tmp_path / "odd")
    torch.save({"a": 1, "b": [2]}, path / "adapter_model.bin")
    (path / ST).unlink()
    assert_refused(loaded, env, {"odd": str(path)}, "'odd'", "adapter_model.bin", "state dict of tensors")


# ------------------------------------------------------------------------------------------------ hub ids


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_not_in_cache(loaded, env, empty_hub_cache):
    hub_id = "someone-blora-test/not-a-real-lora"
    assert_refused(
        loaded,
        env,
        [hub_id],
        re.escape(repr(hub_id)),
        "not in the local Hugging Face cache",
        "cannot be downloaded here",
    )


def test_hub_id_in_local_cache_loads(loaded, env, empty_hub_cache):
    hub_id = "someone-blora-test/cached-lora"
    repo = empty_hub_cache / "models--someone-blora-test--cached-lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(env.mlp, repo / "snapshots" / commit)
    model, lora_map = load_loras(loaded, [hub_id])
    assert lora_map == {"good": 0, hub_id: 1}
    batch = prepare_batch([(PROMPTS[0], hub_id), (PROMPTS[0], "good")], tokenizer(), model, lora_map)
    with torch.no_grad():
        logits = model(**batch).logits
    assert rel_err(logits[0], env.ref["mlp"]) < 1e-4
    assert rel_err(logits[1], env.ref["good"]) < 1e-4


# ---------------------------------------------------------------------------------- load after injection, unload


def test_load_after_injection_and_unload_reuses_the_slot(loaded, env):
    model, lora_map = load_loras(loaded, {"mlp": str(env.mlp)})  # a second call after the first injection
    assert lora_map == {"good": 0, "mlp": 1}
    for name in ("good", "mlp"):
        assert rel_err(logits_for(model, name, env.ids), env.ref[name]) < 1e-4, name

    unload_loras(model, ["good"])
    assert lora_map_of(model) == {"mlp": 1}
    with pytest.raises(KeyError, match="good"):
        prepare_batch([(PROMPTS[0], "good")], tokenizer(), model, lora_map_of(model))

    model, lora_map = load_loras(model, {"third": str(env.third)})
    assert lora_map == {"mlp": 1, "third": 0}, "the freed slot 0 is reused"
    batch = prepare_batch(
        [(PROMPTS[0], "third"), (PROMPTS[0], None), (PROMPTS[0], "mlp")], tokenizer(), model, lora_map
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert rel_err(logits[0], env.ref["third"]) < 1e-4
    assert rel_err(logits[1], env.ref[None]) < 1e-5
    assert rel_err(logits[2], env.ref["mlp"]) < 1e-4

    # The name 'good' is free again and loads into a new slot.
    _, lora_map = load_loras(model, {"good": str(env.good)})
    assert lora_map == {"mlp": 1, "third": 0, "good": 2}
    assert rel_err(logits_for(model, "good", env.ids), env.ref["good"]) < 1e-4


def test_unload_unknown_adapter(loaded, env):
    before = snapshot(loaded, env)
    with pytest.raises(KeyError, match="nope"):
        unload_loras(loaded, ["nope"])
    assert_unchanged(before, snapshot(loaded, env))


def test_unload_everything_gives_the_base_model(loaded, env):
    unload_loras(loaded, ["good"])
    assert lora_map_of(loaded) == {}
    with torch.no_grad():
        assert rel_err(loaded(input_ids=env.ids).logits[0], env.ref[None]) < 1e-5


# ------------------------------------------------------------------------------------------- adapter_ids shape


@pytest.mark.parametrize("n_ids", [3, 4, 5])
def test_adapter_ids_must_match_the_batch_rows(loaded, env, n_ids):
    """adapter_ids whose length does not divide the rows must raise, never silently route tokens elsewhere.

    (Rows that are a multiple of len(adapter_ids) are legitimate: ``generate`` repeats rows for beams and
    num_return_sequences.) n_ids=5 raises today.
    Regression test for n_ids=3 and 4 (fixed): 2 rows x 6 tokens are accepted because 12 tokens divide by 3
    and 4 (LoraBatch._token_slots checks only ``num_tokens % n``): each row's tokens get split over other rows'
    adapter slots, silently.
    """
    ids = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="slots|rows|adapter_ids"), torch.no_grad():
        loaded(input_ids=ids, adapter_ids=torch.zeros(n_ids, dtype=torch.long))


def test_deepcopy_of_a_loaded_model_is_independent(loaded, env):
    """A deep copy must run its own modules and adapters.

    Regression test (fixed): load_loras patches ``forward``/``generate`` on the instance with closures over
    the original model; ``copy.deepcopy`` keeps those closures, so the copy's forward runs the ORIGINAL model's
    modules. After unloading 'good' from the original, the copy silently gives base-model logits for 'good'.
    """
    clone = copy.deepcopy(loaded)
    unload_loras(loaded, ["good"])
    assert rel_err(logits_for(clone, "good", env.ids), env.ref["good"]) < 1e-4
