"""Model families: the engine's own fast forwards for common architectures, behind a small registry.

transformers' modules run every model (``blora.engine.attention`` plugs paged attention into them). A
*family* is an architecture the engine can also run with its own forward over the same flat batch: it
declares what it accepts (decoder layer, norm and activation classes) and which projections it fuses, and
builds its fast model once at load time (``Family.build``: fuse weights, prepack GEMM weights). The runner
asks ``build`` once; None means transformers' modules run every step. Quantized base models
(``blora.models.quant``) run there too: their fused projections are one ``QuantizedLinear`` each.

Module swaps after start-up (``modules_to_save`` and LoRA wrappers installed by ``LoraManager``) bump the
model's structure version (``bump_structure_version``); a fast model re-checks its modules only when that
moved, and hands the step back to transformers' modules if one it relies on was replaced. Code that
replaces submodules of a served model itself calls ``bump_structure_version(model)``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

logger = logging.getLogger("blora")

FastPathMode = Literal["auto", "on", "off"]

# A module transformers built (decoder, layer, attention, norm, its config): the forwards read its
# submodules and fields by name, which ``nn.Module.__getattr__`` types as ``Tensor | Module``; the family's
# checks (``_unsupported``) are what establish those attributes, so they are typed as Any here.
HFModule = Any


@dataclass(frozen=True)
class FastPathOptions:
    """How a family builds its fast model. ``mode``: "auto" uses it where it is faster (CPU with the
    AVX-512 kernel build), "on" wherever the CPU kernels load (the portable build too: slower, same
    results), "off" never. ``packed_weights``: oneDNN-prepacked GEMM weights (a second copy, skipped when
    memory is short). ``lora_max_work``: tokens x rank per adapter up to which the LoRA of a fused
    projection goes through the CPU kernel (``LoraBackend.add_fused``'s bound)."""

    mode: FastPathMode = "auto"
    packed_weights: bool = True
    lora_max_work: int = 8192


class FastModel(Protocol):
    """A family's forward over one flat batch (what the model runner calls)."""

    def usable(self) -> bool:
        """Whether this step can run here: the modules it was built over are still the model's."""
        ...

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [N], ``position_ids`` [N] -> [N, hidden] final-normed hidden states."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The LM head over ``hidden`` [B, hidden], or None (the runner calls the head module)."""
        ...


@dataclass(frozen=True)
class Family:
    """What a family declares: the decoder layer, norm and activation classes it runs (by class name, so
    transformers' classes need not be imported), its fused projections (name -> the modules whose outputs
    are concatenated), and ``build`` (``"module:attribute"``, imported on first use) returning its fast
    model, or a string saying why the model is not one it can run."""

    name: str
    layers: frozenset[str]
    norms: frozenset[str]
    activations: frozenset[str]
    fused: tuple[tuple[str, tuple[str, ...]], ...]
    build: str

    def builder(self) -> Callable[[nn.Module, Family, FastPathOptions], FastModel | str]:
        module, _, attr = self.build.partition(":")
        return getattr(importlib.import_module(module), attr)


FAMILIES: list[Family] = [
    Family(
        name="llama",
        layers=frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}),
        norms=frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}),
        activations=frozenset({"SiLU", "SiLUActivation"}),
        fused=(("qkv", ("q_proj", "k_proj", "v_proj")), ("gate_up", ("gate_proj", "up_proj"))),
        build="blora.models.families.llama:build",
    ),
    Family(  # Llama's forward with per-head q/k RMSNorm before the rotary embedding
        name="qwen3",
        layers=frozenset({"Qwen3DecoderLayer"}),
        norms=frozenset({"Qwen3RMSNorm"}),
        activations=frozenset({"SiLU", "SiLUActivation"}),
        fused=(("qkv", ("q_proj", "k_proj", "v_proj")), ("gate_up", ("gate_proj", "up_proj"))),
        build="blora.models.families.llama:build",
    ),
    Family(  # Llama's forward over the checkpoint's own fused qkv_proj / gate_up_proj
        name="phi3",
        layers=frozenset({"Phi3DecoderLayer"}),
        norms=frozenset({"Phi3RMSNorm"}),
        activations=frozenset({"SiLU", "SiLUActivation"}),
        fused=(("qkv", ("qkv_proj",)), ("gate_up", ("gate_up_proj",))),
        build="blora.models.families.llama:build",
    ),
    Family(  # sandwich (1 + w) norms, q/k norms, GELU-tanh, scaled embeddings, alternating sliding windows
        name="gemma3",
        layers=frozenset({"Gemma3DecoderLayer"}),
        norms=frozenset({"Gemma3RMSNorm"}),
        activations=frozenset({"GELUTanh", "PytorchGELUTanh"}),
        fused=(("qkv", ("q_proj", "k_proj", "v_proj")), ("gate_up", ("gate_proj", "up_proj"))),
        build="blora.models.families.gemma:build",
    ),
    Family(  # Gemma 3's layer without q/k norms, with attention and final logit soft-capping
        name="gemma2",
        layers=frozenset({"Gemma2DecoderLayer"}),
        norms=frozenset({"Gemma2RMSNorm"}),
        activations=frozenset({"GELUTanh", "PytorchGELUTanh"}),
        fused=(("qkv", ("q_proj", "k_proj", "v_proj")), ("gate_up", ("gate_proj", "up_proj"))),
        build="blora.models.families.gemma:build",
    ),
]


def register(family: Family) -> None:
    """Add a family (tried before the built-in ones)."""
    FAMILIES.insert(0, family)


def family_of(model: nn.Module) -> Family | None:
    """The family whose decoder layer class the model's first layer has, or None."""
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    if layers is None or len(layers) == 0:
        return None
    kind = type(layers[0]).__name__
    return next((f for f in FAMILIES if kind in f.layers), None)


def build(model: nn.Module, options: FastPathOptions) -> FastModel | None:
    """The fast model for ``model`` (load-time fusion and prepacking done), or None, with the reason at
    debug level, where no family runs it: then transformers' modules run every step."""
    if options.mode == "off":
        reason = "fast_path='off'"
    elif (family := family_of(model)) is None:
        reason = "no model family matches its decoder layers"
    else:
        built = family.builder()(model, family, options)
        if not isinstance(built, str):
            return built
        reason = built
    if options.mode == "on":
        raise ValueError(f"fast_path='on' but the engine's own forward cannot run this model: {reason}")
    logger.debug("blora: transformers' modules run the model (%s)", reason)
    return None


_VERSION = "_blora_structure_version"


def structure_version(model: nn.Module) -> int:
    """How many times the module tree of ``model`` was changed through ``bump_structure_version``."""
    return model.__dict__.get(_VERSION, 0)


def bump_structure_version(model: nn.Module) -> None:
    """Record that submodules of ``model`` were replaced (fast models re-check theirs before the next step)."""
    model.__dict__[_VERSION] = structure_version(model) + 1
