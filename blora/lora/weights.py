"""Reading PEFT adapter weights from a directory or the local hub cache, safely and with clear errors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from blora.lora.config import AdapterError, LoraConfig

_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
_KNOWN_UNSUPPORTED = {
    "lora_embedding_A": "embedding LoRA (lora_embedding_A/B)",
    "lora_embedding_B": "embedding LoRA (lora_embedding_A/B)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "modules_to_save": "modules_to_save",
}
_PREFIXES = ("base_model.model.", "base_model.")


@dataclass
class ModuleLora:
    """One module's raw LoRA pair as saved by PEFT: ``A`` is [r, in], ``B`` is [out, r]."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class AdapterFiles:
    """A parsed adapter: its config and per-module LoRA pairs keyed by base-model module name."""

    name: str
    source: str
    path: Path
    config: LoraConfig
    modules: dict[str, ModuleLora]


def resolve_adapter_dir(name: str, source: str | Path) -> Path:
    """A local directory, or a hub id that must already be in the local Hugging Face cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists():
        raise AdapterError(f"adapter {name!r}: {text} is a file; pass the adapter's directory")
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise AdapterError(f"adapter {name!r}: directory {text} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
        raise AdapterError(
            f"adapter {name!r}: {text} is not a local directory and is not in the local Hugging Face "
            f"cache; it cannot be downloaded here. Download it elsewhere (`huggingface-cli download {text}`) "
            f"and pass the directory. ({type(exc).__name__})"
        ) from None


def read_adapter(name: str, source: str | Path) -> AdapterFiles:
    """Read ``adapter_config.json`` and the weights (safetensors, or legacy ``.bin`` without pickle code)."""
    path = resolve_adapter_dir(name, source)
    where = f"adapter {name!r}"
    config = LoraConfig.from_file(path / "adapter_config.json", where)
    tensors, fname = _read_tensors(path, where)
    modules = _group_keys(tensors, f"{where} ({fname})")
    if not modules:
        raise AdapterError(f"{where} ({fname}): the file holds no lora_A/lora_B weights")
    return AdapterFiles(name=name, source=str(source), path=path, config=config, modules=modules)


def _read_tensors(path: Path, where: str) -> tuple[dict[str, torch.Tensor], str]:
    st = path / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st)), st.name
        except Exception as exc:
            raise AdapterError(f"{where}: cannot read {st}: {exc}; the file is damaged, re-save it") from None
    legacy = path / "adapter_model.bin"
    if legacy.is_file():
        try:
            state = torch.load(str(legacy), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(
                f"{where}: cannot read {legacy} with torch.load(weights_only=True): {exc}. "
                "Re-save the adapter as safetensors"
            ) from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise AdapterError(f"{where}: {legacy} is not a state dict of tensors")
        return state, legacy.name
    raise AdapterError(f"{where}: {path} has neither adapter_model.safetensors nor adapter_model.bin")


def _group_keys(tensors: dict[str, torch.Tensor], where: str) -> dict[str, ModuleLora]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for marker, what in _KNOWN_UNSUPPORTED.items():
            if f".{marker}" in key or key.startswith(marker):
                raise AdapterError(f"{where}: key {key!r} is {what}, which is not supported yet")
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(
                f"{where}: unexpected key {key!r}; expected '<module>.lora_A.weight' / 'lora_B'"
            )
        module = _strip_prefix(match.group("module"))
        slot = pairs.setdefault(module, {})
        if match.group("kind") in slot:
            raise AdapterError(f"{where}: module {module!r} has two {match.group('kind')} weights")
        slot[match.group("kind")] = tensor
    out: dict[str, ModuleLora] = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise AdapterError(f"{where}: module {module!r} has no {missing} weight")
        out[module] = ModuleLora(A=pair["lora_A"], B=pair["lora_B"])
    return out


def _strip_prefix(module: str) -> str:
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix) :]
    return module
