"""The BLoRA README snippet from issue 2 runs as written (only the paths changed), streaming and not.

The model is a tiny random Llama saved to disk with the SmolLM2 tokenizer; the adapters are PEFT adapters
with non-zero B saved to disk. ``tokenizer.pad_token = 0`` (in BLoRA's README) is not needed.
"""

from __future__ import annotations

import threading

import pytest
import torch

from tests.helpers import make_adapter, save_tiny_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Verbatim from the issue; only the model and adapter paths are substituted.
SNIPPET = """
from transformers import AutoModelForCausalLM, AutoTokenizer
from blora import load_loras, prepare_batch

model = AutoModelForCausalLM.from_pretrained(model_path)
tokenizer = AutoTokenizer.from_pretrained(model_path)
model, lora_map = load_loras(model, ["path/or/hub-id-1", "path/or/hub-id-2", "path/or/hub-id-3"])
inputs = [("Outline a five sentence short story ...", "path/or/hub-id-1"),
          ("Write a 6 line dialogue ...", "path/or/hub-id-2"),
          ("Describe a four sentence scene ...", "path/or/hub-id-3"),
          ("Sculpt a three verse poem ...", "path/or/hub-id-2")]
batch = prepare_batch(inputs, tokenizer, model, lora_map)
outputs = []
for out in model.generate(**batch, max_length=200, stream_output=True):   # one token per row per step
    outputs.append(out)
    decoded = tokenizer.batch_decode(torch.cat([o.reshape(-1, 1) for o in outputs], dim=1))
"""
MAX_LENGTH = 200


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("seed_snippet")
    model_path = save_tiny_model("llama", root / "model")
    base = tiny_model("llama")
    adapters = [
        make_adapter(base, root / "lora1", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        make_adapter(
            base, root / "lora2", 2, r=8, lora_alpha=16, use_rslora=True, target_modules=["gate_proj"]
        ),
        make_adapter(base, root / "lora3", 3, r=2, lora_alpha=4, target_modules="all-linear"),
    ]
    return {
        "model_path": str(model_path),
        **{f"path/or/hub-id-{i}": str(p) for i, p in enumerate(adapters, 1)},
    }


def snippet_source(paths: dict[str, str]) -> str:
    source = SNIPPET
    for placeholder, path in paths.items():
        if placeholder != "model_path":
            source = source.replace(f'"{placeholder}"', repr(path))
    assert "path/or/hub-id" not in source
    return source


@pytest.fixture(scope="module")
def ran(paths) -> dict:
    """The snippet's namespace after it ran (the user has ``import torch`` and ``model_path`` set)."""
    namespace = {"torch": torch, "model_path": paths["model_path"]}
    exec(compile(snippet_source(paths), "<blora README snippet>", "exec"), namespace)
    return namespace


def no_worker_threads() -> bool:
    return not any(t.name == "blora-generate" and t.is_alive() for t in threading.enumerate())


def test_snippet_runs_streaming(ran):
    outputs, batch, decoded = ran["outputs"], ran["batch"], ran["decoded"]
    width = batch["input_ids"].shape[1]
    assert len(outputs) == MAX_LENGTH - width, "generation stopped early (or ran past max_length)"
    assert all(o.shape == (4,) and o.dtype == torch.long for o in outputs), "one token per row per step"
    assert isinstance(decoded, list) and len(decoded) == 4 and all(isinstance(s, str) and s for s in decoded)
    assert ran["tokenizer"].pad_token != 0
    assert no_worker_threads()


def test_streamed_tokens_equal_generate(ran):
    model, batch = ran["model"], ran["batch"]
    generated = model.generate(**batch, max_length=MAX_LENGTH)  # without stream_output: the usual tensor
    assert isinstance(generated, torch.Tensor) and generated.shape == (4, MAX_LENGTH)
    width = batch["input_ids"].shape[1]
    assert torch.equal(generated[:, :width], batch["input_ids"])
    streamed = torch.stack(ran["outputs"], dim=1)
    assert torch.equal(streamed, generated[:, width:])


def test_rows_follow_their_adapters(ran):
    """Rows 2 and 4 share an adapter; each row continues differently from the base model."""
    model, batch = ran["model"], ran["batch"]
    kwargs = dict(max_new_tokens=8, do_sample=False)
    with_adapters = model.generate(**batch, **kwargs)
    base_only = model.generate(
        **{**batch, "adapter_ids": torch.full_like(batch["adapter_ids"], -1)}, **kwargs
    )
    assert batch["adapter_ids"].tolist() == [0, 1, 2, 1]
    assert not torch.equal(with_adapters, base_only)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        base_logits = model(**{k: v for k, v in batch.items() if k != "adapter_ids"}).logits[:, -1]
    for row in range(4):
        assert (logits[row] - base_logits[row]).abs().max() > 1e-2, f"row {row} looks like the base model"


def test_snippet_without_pad_token_and_tokenizer_unchanged(paths):
    """BLoRA's ``tokenizer.pad_token = 0`` is not needed: works with no pad token, and leaves it unset."""
    from transformers import AutoTokenizer

    from blora import load_loras, prepare_batch

    tokenizer = AutoTokenizer.from_pretrained(paths["model_path"])
    tokenizer.pad_token = None
    model = tiny_model("llama")
    model, lora_map = load_loras(model, [paths["path/or/hub-id-1"], paths["path/or/hub-id-2"]])
    inputs = [
        ("A much longer prompt than the other one, with many tokens", paths["path/or/hub-id-2"]),
        ("Hi", None),
    ]
    batch = prepare_batch(inputs, tokenizer, model, lora_map)
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    outputs = list(model.generate(**batch, max_new_tokens=5, do_sample=False, stream_output=True))
    assert tokenizer.pad_token is None
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(torch.stack(outputs, dim=1), generated[:, batch["input_ids"].shape[1] :])


def _in_thread(fn, timeout: float = 120.0):
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) if it does not finish."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "streaming generate hung"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def test_breaking_out_of_the_stream_early(ran):
    model, batch = ran["model"], ran["batch"]

    def break_early():
        got = []
        for out in model.generate(**batch, max_length=MAX_LENGTH, stream_output=True):
            got.append(out)
            if len(got) == 3:
                break
        return got

    first = _in_thread(break_early)
    assert torch.equal(torch.stack(first, 1), torch.stack(ran["outputs"][:3], 1))

    def close_and_abandon():
        stream = model.generate(**batch, max_length=MAX_LENGTH, stream_output=True)
        next(stream)
        stream.close()  # explicit close
        stream = model.generate(**batch, max_length=MAX_LENGTH, stream_output=True)
        next(stream)
        del stream  # dropped without close

    _in_thread(close_and_abandon)
    _in_thread(lambda: [t.join(30) for t in threading.enumerate() if t.name == "blora-generate"])
    assert no_worker_threads()

    # A later generate, streaming or not, works and gives the same tokens as before.
    again = _in_thread(lambda: list(model.generate(**batch, max_new_tokens=10, stream_output=True)))
    assert torch.equal(torch.stack(again, 1), torch.stack(ran["outputs"][:10], 1))
    plain = model.generate(**batch, max_new_tokens=10)
    width = batch["input_ids"].shape[1]
    assert torch.equal(plain[:, width:], torch.stack(ran["outputs"][:10], 1))


def test_error_in_streaming_generate_is_raised_not_hung(ran):
    model, batch = ran["model"], ran["batch"]

    def bad():
        return list(model.generate(**batch, max_new_tokens=3, stream_output=True, not_a_generate_argument=1))

    with pytest.raises(Exception, match="not_a_generate_argument"):
        _in_thread(bad)
    assert no_worker_threads()


def test_two_interleaved_streams_keep_their_own_adapters(ran):
    """Two streams consumed in lock-step run two generate workers at once, each with its own adapter slots."""
    model, batch = ran["model"], ran["batch"]
    flipped = {**batch, "adapter_ids": batch["adapter_ids"].flip(0)}
    kwargs = dict(max_new_tokens=6, do_sample=False)

    def interleaved():
        first = model.generate(**batch, stream_output=True, **kwargs)
        second = model.generate(**flipped, stream_output=True, **kwargs)
        return [(a, b) for a, b in zip(first, second, strict=True)]

    pairs = _in_thread(interleaved)
    width = batch["input_ids"].shape[1]
    alone_first = model.generate(**batch, **kwargs)[:, width:]
    alone_second = model.generate(**flipped, **kwargs)[:, width:]
    assert torch.equal(torch.stack([a for a, _ in pairs], 1), alone_first)
    assert torch.equal(torch.stack([b for _, b in pairs], 1), alone_second)
    assert not torch.equal(alone_first, alone_second)
    assert no_worker_threads()


def test_streaming_runs_on_the_consumers_thread_and_keeps_its_grad_mode(ran):
    """generate runs on the caller's OS thread (a second thread would bring a second OpenMP team, which
    makes every op pay a thread wake-up); between steps the consumer keeps its own grad mode."""
    model, batch = ran["model"], ran["batch"]
    threads = set()
    hook = model.get_input_embeddings().register_forward_hook(lambda *_: threads.add(threading.get_ident()))
    grads = []
    try:
        with torch.enable_grad():
            for _ in model.generate(**batch, max_new_tokens=3, stream_output=True):
                grads.append(torch.is_grad_enabled())
    finally:
        hook.remove()
    assert threads == {threading.get_ident()}
    assert grads == [True, True, True]
