"""blora: batched multi-LoRA inference. One base model, many PEFT adapters, one forward pass."""

from blora.library import load_loras, prepare_batch, unload_loras
from blora.lora import AdapterError, LoraManager, lora_batch
from blora.models import load_model

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "LoraManager",
    "load_loras",
    "load_model",
    "lora_batch",
    "prepare_batch",
    "unload_loras",
]

from blora.engine import LLM, LoRARequest, SamplingParams  # noqa: E402

__all__ += ["LLM", "LoRARequest", "SamplingParams"]
