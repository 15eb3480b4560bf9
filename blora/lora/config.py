"""PEFT ``adapter_config.json`` parsing and validation, with PEFT's exact module-matching rules."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class AdapterError(ValueError):
    """An adapter could not be loaded; the message names the adapter, file or key and what to do."""


# Fields that change the math of a LoRA layer and that this version does not compute (yet).
_UNSUPPORTED = {
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "BD-LoRA (use_bdlora=true)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}
_UNSUPPORTED_INIT = {"mica": "MiCA (init_lora_weights='mica')"}
_BIAS_OK = ("none",)


@dataclass
class LoraConfig:
    """The subset of a PEFT ``LoraConfig`` that defines the adapter's computation."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str | None
    use_rslora: bool = False
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: list[str] | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> LoraConfig:
        """Validate a parsed ``adapter_config.json``; ``where`` names the adapter/file in errors."""
        peft_type = str(raw.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"{where}: peft_type is {peft_type!r}; blora serves LoRA adapters only")
        for key, what in _UNSUPPORTED.items():
            if raw.get(key):
                raise AdapterError(
                    f"{where}: {what} is not supported yet (field {key!r}); "
                    "retrain without it or merge that part into the base model"
                )
        init = raw.get("init_lora_weights")
        if isinstance(init, str) and init.lower() in _UNSUPPORTED_INIT:
            raise AdapterError(
                f"{where}: {_UNSUPPORTED_INIT[init.lower()]} is not supported yet (field 'init_lora_weights')"
            )
        if raw.get("use_dora") and raw.get("lora_bias"):
            raise AdapterError(f"{where}: lora_bias=true with DoRA is not defined (PEFT refuses it too)")
        if raw.get("bias", "none") not in _BIAS_OK:
            raise AdapterError(f"{where}: bias={raw['bias']!r} is not supported yet; only bias='none'")
        cfg = cls(
            r=_positive_int(raw.get("r", 8), "r", where),
            lora_alpha=_number(raw.get("lora_alpha", 8), "lora_alpha", where),
            target_modules=raw.get("target_modules"),
            use_rslora=bool(raw.get("use_rslora", False)),
            exclude_modules=raw.get("exclude_modules"),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            layers_to_transform=raw.get("layers_to_transform"),
            layers_pattern=raw.get("layers_pattern"),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            use_dora=bool(raw.get("use_dora", False)),
            lora_bias=bool(raw.get("lora_bias", False)),
            modules_to_save=_str_list(raw.get("modules_to_save"), "modules_to_save", where),
        )
        for key, value in cfg.rank_pattern.items():
            _positive_int(value, f"rank_pattern[{key!r}]", where)
        for key, value in cfg.alpha_pattern.items():
            _number(value, f"alpha_pattern[{key!r}]", where)
        if cfg.target_modules is None:
            raise AdapterError(f"{where}: target_modules is missing; PEFT needs it to place the LoRA layers")
        return cfg

    @classmethod
    def from_file(cls, path: Path, where: str) -> LoraConfig:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise AdapterError(
                f"{where}: {path} does not exist; a PEFT adapter needs adapter_config.json"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AdapterError(f"{where}: cannot read {path}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise AdapterError(f"{where}: {path} is not valid JSON ({exc}); re-save the adapter") from None
        if not isinstance(raw, dict):
            raise AdapterError(f"{where}: {path} must hold a JSON object")
        return cls.from_dict(raw, f"{where} ({path.name})")

    def targets(self, key: str, all_linear: set[str] | None = None) -> bool:
        """Whether PEFT would put a LoRA layer on module ``key`` (PEFT's ``check_target_module_exists``)."""
        if self._excluded(key):
            return False
        tm = self.target_modules
        if isinstance(tm, str):
            if tm.lower() == "all-linear":
                return all_linear is not None and key in all_linear
            return re.fullmatch(tm, key) is not None
        if key in tm:
            return True
        if not any(key.endswith(f".{t}") for t in tm):
            return False
        return self._layer_selected(key)

    def _excluded(self, key: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, key) is not None
        return key in ex or any(key.endswith(f".{e}") for e in ex)

    def _layer_selected(self, key: str) -> bool:
        layers = self.layers_to_transform
        if layers is None or (isinstance(layers, list) and not layers):
            return True
        pattern = self.layers_pattern
        match = None
        if not pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if match:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers

    def rank_for(self, key: str) -> int:
        return int(self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r))

    def scale_for(self, key: str) -> float:
        """PEFT's ``scaling``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = self.rank_for(key)
        alpha = float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict[str, Any], key: str) -> str:
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _str_list(value: Any, name: str, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise AdapterError(f"{where}: {name} must be a list of module names, got {value!r}")
    return list(value)


def _positive_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)
