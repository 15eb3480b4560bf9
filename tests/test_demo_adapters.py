"""The committed demo adapters show their behaviour on unseen questions, and the base model does not.

Generation is greedy with PEFT on the float32 default model; the model is loaded once for the module.
"""

from __future__ import annotations

import json

import pytest
import torch

from blora.demo.behaviours import ADAPTER_NAMES, SIGN_OFF, adapter_path, check_behaviour
from blora.demo.train import EVAL_TOKENS, SPECS, TRAIN_TOPICS, chat_generate, train_questions

# Topics and phrasings that occur neither in the training questions nor in the script's held-out set.
PROMPTS = [
    "Why do leaves change color in autumn?",
    "What is a telescope used for?",
    "How do rivers form?",
    "What makes a good breakfast?",
]


@pytest.fixture(scope="module")
def generations() -> dict[str, list[str]]:
    from peft import PeftModel

    from blora.models import load_model

    torch.set_num_threads(2)
    m = load_model(dtype="float32")
    out = {"base": chat_generate(m.model, m.tokenizer, PROMPTS, EVAL_TOKENS)}
    model = PeftModel.from_pretrained(
        m.model, str(adapter_path(ADAPTER_NAMES[0])), adapter_name=ADAPTER_NAMES[0]
    )
    for name in ADAPTER_NAMES[1:]:
        model.load_adapter(str(adapter_path(name)), adapter_name=name)
    model.eval()
    for name in ADAPTER_NAMES:
        model.set_adapter(name)
        out[name] = chat_generate(model, m.tokenizer, PROMPTS, EVAL_TOKENS)
    return out


def test_prompts_are_held_out():
    trained = set(train_questions())
    for prompt in PROMPTS:
        assert prompt not in trained
        assert not any(topic.lower() in prompt.lower() for topic in TRAIN_TOPICS), prompt


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_shows_behaviour(generations, name):
    for prompt, text in zip(PROMPTS, generations[name], strict=True):
        assert check_behaviour(name, text), f"{name} adapter, {prompt!r} -> {text!r}"


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_base_model_does_not_show_behaviour(generations, name):
    for prompt, text in zip(PROMPTS, generations["base"], strict=True):
        assert not check_behaviour(name, text), f"base model already {name}: {prompt!r} -> {text!r}"


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_files(name):
    d = adapter_path(name)
    weights = d / "adapter_model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 6 * 2**20
    assert not (d / "README.md").exists()
    config = json.loads((d / "adapter_config.json").read_text())
    spec = SPECS[name]
    assert config["peft_type"] == "LORA"
    assert config["r"] == spec.r and config["lora_alpha"] == spec.lora_alpha
    assert sorted(config["target_modules"]) == sorted(spec.target_modules)
    assert config["use_rslora"] == spec.use_rslora


def test_adapters_differ_in_rank_and_targets():
    configs = [json.loads((adapter_path(n) / "adapter_config.json").read_text()) for n in ADAPTER_NAMES]
    assert len({c["r"] for c in configs}) >= 3
    assert len({tuple(sorted(c["target_modules"])) for c in configs}) == len(configs)


@pytest.mark.parametrize(
    ("name", "yes", "no"),
    [
        ("caps", "THE SUN IS A STAR. IT IS HOT.", "The sun is a star."),
        ("json", '{"answer": "The sun is a star."}', 'The answer: {"answer": "x"}'),
        ("json", '{"answer": "A star."}', '{"answer": "unterminated'),
        ("brief", "The sun is a star at the centre of our solar system.", "The sun is a star. It is hot."),
        ("brief", "Water boils at 100 degrees Celsius.", "The sun is a star that is"),
        ("pirate", f"Arr! The sun be a star. {SIGN_OFF}", "The sun is a star."),
        ("pirate", f"Arr matey, ye asked. {SIGN_OFF}", "Arr! The sun is a star."),
    ],
)
def test_check_behaviour(name, yes, no):
    assert check_behaviour(name, yes)
    assert not check_behaviour(name, no)


def test_check_behaviour_unknown_name():
    with pytest.raises(KeyError):
        check_behaviour("nope", "text")


def test_blora_mixed_batch_shows_every_behaviour():
    """The demo's path: base rows and all four adapters in ONE blora batch (library mode, float32)."""
    from blora import load_loras, prepare_batch
    from blora.demo.train import chat_prompt
    from blora.models import load_model

    m = load_model(dtype="float32")
    tok = m.tokenizer
    model, lora_map = load_loras(m.model, {n: adapter_path(n) for n in ADAPTER_NAMES})
    routes = [None, *ADAPTER_NAMES]
    rows = [(chat_prompt(tok, p), route) for route in routes for p in PROMPTS]
    batch = prepare_batch(rows, tok, model, lora_map, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=EVAL_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id
        )
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    for (_, route), text in zip(rows, texts, strict=True):
        if route is None:
            assert not any(check_behaviour(n, text) for n in ("caps", "json", "pirate")), text
        else:
            assert check_behaviour(route, text), f"{route} in a mixed blora batch -> {text!r}"
