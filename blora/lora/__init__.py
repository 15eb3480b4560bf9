"""LoRA adapters: PEFT config parsing and validation, weights, layer wrappers, batched ops, slot manager,
adapter store (registry, tiers, prefetch) and per-request mixtures."""

from blora.lora.config import AdapterError, LoraConfig
from blora.lora.context import lora_batch
from blora.lora.layers import LoraLinear
from blora.lora.manager import AdapterInfo, LoraManager
from blora.lora.mixtures import Mixture
from blora.lora.store import AdapterInUseError, AdapterStore, StoreConfig

__all__ = [
    "AdapterError",
    "AdapterInUseError",
    "AdapterInfo",
    "AdapterStore",
    "LoraConfig",
    "LoraLinear",
    "LoraManager",
    "Mixture",
    "StoreConfig",
    "lora_batch",
]
