"""Reading PEFT adapter weights from a directory or the local hub cache, safely and with clear errors."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blora.lora.config import AdapterError, LoraConfig

_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.(?P<param>weight|bias)"
    r"|(?P<extra>lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?"
    r"|(?P<base>base_layer)\.weight)$"
)
_KNOWN_UNSUPPORTED = {"modules_to_save.": "an unsaved modules_to_save wrapper key"}
_PREFIXES = ("base_model.model.", "base_model.")


@dataclass
class ModuleLora:
    """One module's raw LoRA weights as saved by PEFT: ``A`` is [r, in], ``B`` is [out, r] (embedding
    LoRA: ``lora_embedding_A`` [r, num_embeddings], ``lora_embedding_B`` [dim, r]); ``bias``: ``lora_B``'s
    bias (``lora_bias=True``); ``magnitude``: DoRA's [out]; ``base_weight``: a copy of the base layer's
    weight that PEFT saves with embedding / ``lm_head`` adapters (must equal the base model's)."""

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    embedding: bool = False
    base_weight: torch.Tensor | None = None

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
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # modules_to_save params


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
    saved = _saved_modules(tensors, config.modules_to_save or [], f"{where} ({fname})")
    modules = _group_keys(tensors, f"{where} ({fname})")
    if not modules and not saved:
        raise AdapterError(f"{where} ({fname}): the file holds no lora_A/lora_B weights")
    return AdapterFiles(name=name, source=str(source), path=path, config=config, modules=modules, saved=saved)


def _read_tensors(path: Path, where: str) -> tuple[dict[str, torch.Tensor], str]:
    st = path / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return _read_safetensors(st), st.name
        except Exception:
            pass  # not the plain layout this reader handles: let safetensors read it (or say why not)
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


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file from one ``read``, as views of that buffer (a cold adapter is read
    in one sequential I/O instead of one storage slice per tensor). Raises on anything unusual."""
    data = bytearray(path.stat().st_size)
    with open(path, "rb", buffering=0) as f:
        if f.readinto(data) != len(data):
            raise ValueError("short read")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + n]))
    base = 8 + n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        shape = info["shape"]
        count = end - start
        numel = count // dtype.itemsize
        if end > len(data) - base or numel != math.prod(shape) or (base + start) % dtype.itemsize:
            raise ValueError(f"tensor {key!r} does not fit the file")
        buffer = memoryview(data)[base + start : base + end]
        out[key] = (
            torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)
            if numel
            else torch.empty(shape, dtype=dtype)
        )
    return out


def _saved_modules(
    tensors: dict[str, torch.Tensor], modules_to_save: list[str], where: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Pop the full-module parameters of ``modules_to_save`` (PEFT saves them as ``<module>.<param>``,
    matching a module when its name ends with an entry)."""
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(tensors):
        if _KEY.match(key):
            continue
        parts = _strip_prefix(key).split(".")
        for i in range(1, len(parts)):  # the outermost module that matches, like PEFT's wrapping
            module = ".".join(parts[:i])
            if any(module.endswith(m) for m in modules_to_save):
                saved.setdefault(module, {})[".".join(parts[i:])] = tensors.pop(key)
                break
    return saved


_FIELDS = {"lora_embedding_A": "A", "lora_embedding_B": "B", "lora_magnitude_vector": "magnitude"}


def _group_keys(tensors: dict[str, torch.Tensor], where: str) -> dict[str, ModuleLora]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedding: set[str] = set()
    for key, tensor in tensors.items():
        for marker, what in _KNOWN_UNSUPPORTED.items():
            if f".{marker}" in key or key.startswith(marker):
                raise AdapterError(f"{where}: key {key!r} is {what}, which is not supported")
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(
                f"{where}: unexpected key {key!r}; expected '<module>.lora_A.weight' / 'lora_B' (or a "
                "module listed in modules_to_save)"
            )
        module = _strip_prefix(match.group("module"))
        if match.group("kind"):
            field_name = {"weight": match.group("kind")[-1], "bias": "bias"}[match.group("param")]
            if match.group("kind") == "lora_A" and field_name == "bias":
                raise AdapterError(f"{where}: unexpected key {key!r}; lora_A has no bias")
        elif match.group("extra"):
            field_name = _FIELDS[match.group("extra")]
            embedding |= {module} if match.group("extra").startswith("lora_embedding") else set()
        else:
            field_name = "base_weight"
        slot = parts.setdefault(module, {})
        if field_name in slot:
            raise AdapterError(f"{where}: module {module!r} has two {match.group(0)!r}-like weights")
        slot[field_name] = tensor
    out: dict[str, ModuleLora] = {}
    for module, fields in parts.items():
        if "A" not in fields or "B" not in fields:
            if set(fields) == {"base_weight"}:
                continue  # a base layer copy without LoRA: compared by nothing, ignored
            missing = "lora_A" if "A" not in fields else "lora_B"
            raise AdapterError(f"{where}: module {module!r} has no {missing} weight")
        out[module] = ModuleLora(embedding=module in embedding, **fields)
    return out


def _strip_prefix(module: str) -> str:
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix) :]
    return module
