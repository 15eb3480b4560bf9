"""LoRA adapters: PEFT config parsing and validation, weights, layer wrappers, batched ops, slot manager."""

from blora.lora.config import AdapterError, LoraConfig
from blora.lora.context import lora_batch
from blora.lora.layers import LoraLinear
from blora.lora.manager import AdapterInfo, LoraManager

__all__ = ["AdapterError", "AdapterInfo", "LoraConfig", "LoraLinear", "LoraManager", "lora_batch"]
