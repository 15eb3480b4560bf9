"""The engine on the embedded SmolLM2-135M-Instruct (float32, loaded once for the module): a mixed batch of
chat requests with and without adapters equals transformers ``generate`` / PEFT run per request."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from blora.engine import LLM, SamplingParams
from tests.helpers import make_adapter

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain, step by step and with an example, how a bicycle stays upright while it moves forward.",
    "Hi",
    "List three fruits.",
    "Why is the sky blue? Answer in one sentence.",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from blora.models import load_model

    loaded = load_model(dtype="float32")
    root = tmp_path_factory.mktemp("smollm-adapters")
    specs = {
        "attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "mlp": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
        "all": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    }
    adapters = {}
    for i, (name, spec) in enumerate(specs.items()):
        path = make_adapter(loaded.model, root / name, seed=i, **spec)
        adapters[name] = str(path)
    return loaded, adapters


def chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tok.encode(text, add_special_tokens=False)


def reference(model, adapter_dir: str | None, ids: list[int]) -> list[int]:
    ref_model = model if adapter_dir is None else PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir)
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_mixed_chat_batch_matches_generate_and_peft(smollm):
    loaded, adapters = smollm
    tok = loaded.tokenizer
    names = [None, "attn", "mlp", "all", "attn", None]
    ids = [chat_ids(tok, q) for q in QUESTIONS]
    expected = [
        reference(loaded.model, adapters[n] if n else None, p) for p, n in zip(ids, names, strict=True)
    ]
    llm = LLM(copy.deepcopy(loaded.model), tokenizer=tok, adapters=adapters, max_num_batched_tokens=48)
    outs = llm.chat(
        [[{"role": "user", "content": q}] for q in QUESTIONS],
        SamplingParams(max_tokens=NEW_TOKENS, temperature=0),
        adapters=names,
    )
    for out, exp, name in zip(outs, expected, names, strict=True):
        assert out.prompt_token_ids == ids[outs.index(out)]
        assert out.outputs[0].token_ids == exp, name
        assert out.outputs[0].text == tok.decode(exp, skip_special_tokens=True)
    assert any(o.outputs[0].finish_reason == "stop" for o in outs) or all(
        len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs
    )


def test_default_dtype_engine_chats(smollm):
    llm = LLM(max_num_seqs=8)  # the embedded model in the default dtype (bfloat16 where native)
    outs = llm.chat(
        [[{"role": "user", "content": "What is 2 + 2?"}]], SamplingParams(max_tokens=24, temperature=0)
    )
    text = outs[0].outputs[0].text
    assert text.strip() and "4" in text
