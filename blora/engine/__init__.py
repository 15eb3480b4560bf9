"""Continuous-batching multi-LoRA engine: sequences, paged KV blocks, scheduler, model runner, sampler."""

from blora.engine.async_llm import AsyncLLM
from blora.engine.llm import LLM
from blora.engine.llm_engine import EngineConfig, LLMEngine
from blora.engine.lora_request import LoRARequest
from blora.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, RequestOutputKind
from blora.engine.process import EngineDeadError, EngineProcess
from blora.engine.sampling_params import SamplingParams

__all__ = [
    "AsyncLLM",
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "EngineProcess",
    "LLMEngine",
    "LoRARequest",
    "RequestMetrics",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
]
