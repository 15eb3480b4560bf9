"""Base model loading (HF dir, hub id, GGUF, the embedded default) and device/dtype selection."""

from blora.models.device import resolve_device, resolve_dtype
from blora.models.loader import LoadedModel, ModelLoadError, default_model_dir, load_model

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "default_model_dir",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]
