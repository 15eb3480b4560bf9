"""PEFT ``adapter_config.json`` parsing and validation, with PEFT's exact module-matching rules.

Every regex of a config is matched through ``blora.lora.patterns`` (time-bounded, without holding the GIL);
the config file is read with a size limit, through ``blora.lora.paths`` when it must stay inside a root.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from blora.lora.errors import AdapterError
from blora.lora.paths import open_inside, os_reason
from blora.lora.patterns import Pattern, PatternBudget

MAX_CONFIG_BYTES = 1 << 20  # a PEFT config of a large model with a rank_pattern per module is ~50 KB

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
    """The subset of a PEFT ``LoraConfig`` that defines the adapter's computation.

    ``where`` names the adapter and file in errors; the compiled patterns and their shared time budget
    are built on first use."""

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
    where: str = field(default="adapter", repr=False, compare=False)
    _compiled: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> LoraConfig:
        """Validate a parsed ``adapter_config.json``; ``where`` names the adapter/file in errors."""
        _check_supported(raw, where)
        cfg = cls(
            r=_positive_int(raw.get("r", 8), "r", where),
            lora_alpha=_number(raw.get("lora_alpha", 8), "lora_alpha", where),
            target_modules=_names(raw.get("target_modules"), "target_modules", where),
            use_rslora=_flag(raw, "use_rslora", where),
            exclude_modules=_names(raw.get("exclude_modules"), "exclude_modules", where),
            rank_pattern=_patterns(raw.get("rank_pattern"), "rank_pattern", where, _positive_int),
            alpha_pattern=_patterns(raw.get("alpha_pattern"), "alpha_pattern", where, _number),
            layers_to_transform=_layers(raw.get("layers_to_transform"), where),
            layers_pattern=_names(raw.get("layers_pattern"), "layers_pattern", where),
            fan_in_fan_out=_flag(raw, "fan_in_fan_out", where),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            use_dora=_flag(raw, "use_dora", where),
            lora_bias=_flag(raw, "lora_bias", where),
            modules_to_save=_str_list(raw.get("modules_to_save"), "modules_to_save", where),
            where=where,
        )
        if cfg.target_modules is None:
            raise AdapterError(f"{where}: target_modules is missing; PEFT needs it to place the LoRA layers")
        return cfg

    @classmethod
    def from_file(cls, path: Path, where: str, root: str | Path | None = None) -> LoraConfig:
        """Read and validate ``path`` (at most ``MAX_CONFIG_BYTES``; inside ``root`` when given)."""
        try:
            with open_inside(path, root, where) as f:
                data = f.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            raise AdapterError(
                f"{where}: {path} does not exist; a PEFT adapter needs adapter_config.json"
            ) from None
        except OSError as exc:
            raise AdapterError(f"{where}: cannot read {path.name}: {os_reason(exc)}") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise AdapterError(
                f"{where}: {path.name} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a PEFT adapter config "
                "is a few KB, refused"
            )
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise AdapterError(f"{where}: cannot read {path}: {exc}") from None
        except (json.JSONDecodeError, RecursionError) as exc:
            raise AdapterError(f"{where}: {path} is not valid JSON ({exc}); re-save the adapter") from None
        if not isinstance(raw, dict):
            raise AdapterError(f"{where}: {path} must hold a JSON object")
        return cls.from_dict(raw, f"{where} ({path.name})")

    def pattern_entries(self) -> dict[str, int]:
        """Entries of each list / pattern field that is matched against every module name."""
        fields = ("target_modules", "exclude_modules", "layers_pattern", "rank_pattern", "alpha_pattern")
        out = {}
        for name in fields:
            value = getattr(self, name)
            out[name] = 1 if isinstance(value, str) else len(value or ())
        return out

    def targets(self, key: str, all_linear: set[str] | None = None) -> bool:
        """Whether PEFT would put a LoRA layer on module ``key`` (PEFT's ``check_target_module_exists``)."""
        if self._excluded(key):
            return False
        tm = self.target_modules
        if isinstance(tm, str):
            if tm.lower() == "all-linear":
                return all_linear is not None and key in all_linear
            return self._pattern("target_modules", tm, "target_modules").fullmatch(key) is not None
        assert tm is not None  # refused when the config is parsed (from_dict)
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
            return self._pattern("exclude_modules", ex, "exclude_modules").fullmatch(key) is not None
        return key in ex or any(key.endswith(f".{e}") for e in ex)

    def _layer_selected(self, key: str) -> bool:
        layers = self.layers_to_transform
        if layers is None or (isinstance(layers, list) and not layers):
            return True
        pattern = self.layers_pattern
        match = None
        if not pattern:
            match = _LAYER_INDEX.match(key)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                text = rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\."
                match = self._pattern(f"layers_pattern:{p}", text, "layers_pattern").match(key)
                if match:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        if isinstance(layers, int):
            return idx == layers
        if "layers" not in self._compiled:
            self._compiled["layers"] = frozenset(layers)
        return idx in self._compiled["layers"]

    def rank_for(self, key: str) -> int:
        return int(self.rank_pattern.get(self._pattern_key("rank_pattern", key), self.r))

    def alpha_for(self, key: str) -> float:
        return float(self.alpha_pattern.get(self._pattern_key("alpha_pattern", key), self.lora_alpha))

    def scale_for(self, key: str) -> float:
        """PEFT's ``scaling``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = self.rank_for(key)
        alpha = self.alpha_for(key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def describe_scale(self, key: str) -> str:
        """How ``scale_for(key)`` came about, naming the config fields (for error messages)."""
        alpha_src = (
            "alpha_pattern" if self._pattern_key("alpha_pattern", key) in self.alpha_pattern else "lora_alpha"
        )
        r_src = "rank_pattern" if self._pattern_key("rank_pattern", key) in self.rank_pattern else "r"
        div = f"sqrt({r_src})" if self.use_rslora else r_src
        return f"scaling {self.scale_for(key):g} = {alpha_src} {self.alpha_for(key):g} / {div} {self.rank_for(key)}"

    def _pattern_key(self, field_name: str, key: str) -> str:
        """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", key)``."""
        cache = self._compiled.setdefault(f"matched {field_name}", {})  # pattern slots start "<field>:"
        if key not in cache:
            cache[key] = key
            for p in getattr(self, field_name):
                if self._pattern(f"{field_name}:{p}", rf"(.*\.)?({p})$", f"{field_name} key").match(key):
                    cache[key] = p
                    break
        return cache[key]

    def _pattern(self, slot: str, text: str, field_name: str) -> Pattern:
        pattern = self._compiled.get(slot)
        if pattern is None:
            if "budget" not in self._compiled:
                self._compiled["budget"] = PatternBudget()
            pattern = self._compiled[slot] = Pattern(text, field_name, self.where, self._compiled["budget"])
        return pattern


_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")  # PEFT's default layer index pattern (linear-time)


def _check_supported(raw: dict[str, Any], where: str) -> None:
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{where}: peft_type is {peft_type[:40]!r}; blora serves LoRA adapters only")
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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _names(value: Any, name: str, where: str) -> list[str] | str | None:
    """A module-name field: a regex string or a list of names (PEFT accepts both)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise AdapterError(
        f"{where}: {name} must be a string (regex) or a list of module names, got {_short(value)}"
    )


T = TypeVar("T")


def _patterns(value: Any, name: str, where: str, check: Callable[[Any, str, str], T]) -> dict[str, T]:
    if not value:
        return {}
    if not isinstance(value, dict):
        raise AdapterError(f"{where}: {name} must be an object {{pattern: value}}, got {_short(value)}")
    return {key: check(v, f"{name}[{_short(key)}]", where) for key, v in value.items()}


def _layers(value: Any, where: str) -> list[int] | int | None:
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if value is None or ok(value):
        return value
    if isinstance(value, (list, tuple)) and all(ok(v) for v in value):
        return list(value)
    raise AdapterError(
        f"{where}: layers_to_transform must be an integer or a list of them, got {_short(value)}"
    )


def _flag(raw: dict[str, Any], name: str, where: str) -> bool:
    value = raw.get(name, False)
    if value is None or value in (0, 1):  # JSON true/false (and 0/1, which PEFT treats the same)
        return bool(value)
    raise AdapterError(f"{where}: {name} must be true or false, got {_short(value)}")


def _str_list(value: Any, name: str, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise AdapterError(f"{where}: {name} must be a list of module names, got {_short(value)}")
    return list(value)


def _positive_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterError(f"{where}: {name} must be a positive integer, got {_short(value)}")
    return value


def _number(value: Any, name: str, where: str) -> float:
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise AdapterError(f"{where}: {name} must be a finite number, got {_short(value)}")
    return number
