"""Reading PEFT adapter weights from a directory or the local hub cache, safely and with clear errors."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from blora.lora.config import AdapterError, LoraConfig
from blora.lora.paths import open_inside, os_reason

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
    text = str(source)
    shown = text if len(text) <= 200 else text[:197] + "..."
    try:
        path = Path(source).expanduser()
        if path.is_dir():
            return path
        exists = path.exists()
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop, "~user" without a home
        raise AdapterError(f"adapter {name!r}: cannot use {shown}: {os_reason(exc)}") from None
    if exists:
        raise AdapterError(f"adapter {name!r}: {shown} is a file; pass the adapter's directory")
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise AdapterError(f"adapter {name!r}: directory {shown} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
        raise AdapterError(
            f"adapter {name!r}: {text} is not a local directory and is not in the local Hugging Face "
            f"cache; it cannot be downloaded here. Download it elsewhere (`huggingface-cli download {text}`) "
            f"and pass the directory. ({type(exc).__name__})"
        ) from None


SizeCheck = Callable[[LoraConfig, "int | None", int, str], None]
"""``check(config, values, data_bytes, file_name)``: raises ``AdapterError`` when a weights file declaring
``values`` numbers (None: unknown before reading, a legacy ``.bin``) in ``data_bytes`` bytes is more than an
adapter with ``config`` can hold. Called after the header is read and before any tensor data is."""


def read_adapter(
    name: str, source: str | Path, *, root: str | Path | None = None, check_size: SizeCheck | None = None
) -> AdapterFiles:
    """Read ``adapter_config.json`` and the weights (safetensors, or legacy ``.bin`` without pickle code).

    ``root``: every file opened must lie inside it (symlinks included); ``check_size``: see ``SizeCheck``.
    """
    path = resolve_adapter_dir(name, source)
    where = f"adapter {name!r}"
    config = LoraConfig.from_file(path / "adapter_config.json", where, root)

    def check(values: int | None, data_bytes: int, fname: str) -> None:
        if check_size is not None:
            check_size(config, values, data_bytes, fname)

    tensors, fname = _read_tensors(path, where, root, check)
    saved = _saved_modules(tensors, config.modules_to_save or [], f"{where} ({fname})")
    modules = _group_keys(tensors, f"{where} ({fname})")
    if not modules and not saved:
        raise AdapterError(f"{where} ({fname}): the file holds no lora_A/lora_B weights")
    return AdapterFiles(name=name, source=str(source), path=path, config=config, modules=modules, saved=saved)


def _read_tensors(
    path: Path, where: str, root: str | Path | None, check: Callable[[int | None, int, str], None]
) -> tuple[dict[str, torch.Tensor], str]:
    st = path / "adapter_model.safetensors"
    try:
        with open_inside(st, root, where) as f:
            return read_safetensors(f, st, where, check), st.name
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise AdapterError(f"{where}: cannot read {st.name}: {os_reason(exc)}") from None
    legacy = path / "adapter_model.bin"
    try:
        with open_inside(legacy, root, where) as f:
            return _read_legacy(f, legacy, where, check), legacy.name
    except FileNotFoundError:
        raise AdapterError(
            f"{where}: {path} has neither adapter_model.safetensors nor adapter_model.bin"
        ) from None
    except OSError as exc:
        raise AdapterError(f"{where}: cannot read {legacy.name}: {os_reason(exc)}") from None


def _read_legacy(
    f: BinaryIO, legacy: Path, where: str, check: Callable[[int | None, int, str], None]
) -> dict[str, torch.Tensor]:
    check(None, os.fstat(f.fileno()).st_size, legacy.name)
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterError(
            f"{where}: cannot read {legacy} with torch.load(weights_only=True): {exc}. "
            "Re-save the adapter as safetensors"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
    ):
        raise AdapterError(f"{where}: {legacy} is not a state dict of tensors")
    return state


MAX_HEADER_BYTES = 8 << 20  # ~150 bytes per tensor: 50,000 tensors (the safetensors library allows 100 MB)


def read_safetensors(
    f: BinaryIO, path: Path, where: str, check: Callable[[int | None, int, str], None]
) -> dict[str, torch.Tensor]:
    """All tensors of an open safetensors file, parsed and checked by the safetensors library itself
    (``safetensors.torch.load`` on the bytes: offsets, sizes, dtypes, as the library checks them).

    Before any tensor data is read, the header is read on its own (at most ``MAX_HEADER_BYTES``) and the
    numbers it declares go through ``check(values, data_bytes, file_name)``: a huge file is refused
    without being read. The hand-written zero-copy reader this replaces was faster (3.5 MiB demo adapter,
    hot: 14 vs 23 ms; 18.7 MiB: 33 vs 42 ms hot, about equal cold; ``benchmarks/adapter_read_bench.py``)
    but missed checks the library makes (overlapping offsets); ``load_file`` (mmap) is slower still.
    """
    from safetensors.torch import load

    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if n > MAX_HEADER_BYTES:
        raise AdapterError(
            f"{where}: cannot read {path}: its header is {n} bytes, more than {MAX_HEADER_BYTES >> 20} MiB "
            "(an adapter's is a few KB); the file is damaged or not an adapter"
        )
    header = f.read(n) if 0 <= n <= size else b""
    values = _declared_values(header) if len(header) == n else None
    try:
        if values is None:
            load(prefix + header)  # the library's reason why this header is wrong
            raise ValueError("the header is not a safetensors header")
    except Exception as exc:  # SafetensorError, ValueError, ...
        raise AdapterError(f"{where}: cannot read {path}: {exc}; the file is damaged, re-save it") from None
    check(values, size - 8 - n, path.name)
    f.seek(0)
    data = f.read()
    try:
        return load(data)
    except Exception as exc:
        raise AdapterError(f"{where}: cannot read {path}: {exc}; the file is damaged, re-save it") from None


def _declared_values(header: bytes) -> int | None:
    """Numbers the tensors of a safetensors header hold (None if it is not a header this reads)."""
    try:
        parsed = json.loads(header)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    total = 0
    for key, info in parsed.items():
        if key == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return None
        total += math.prod(shape)
    return total


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
