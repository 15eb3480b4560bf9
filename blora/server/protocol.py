"""OpenAI-compatible request and response models (field names follow the OpenAI API and vLLM's extensions).

Requests are validated here, before anything reaches the engine: wrong types, out-of-range values and
unsupported features become a 400 with the offending field named in ``param``. No field is silently
ignored: the generation requests refuse unknown fields, accept the bookkeeping ones (``user``, ``metadata``,
``store``, ``service_tier``, ...) and refuse a non-default value of a known field blora does not implement.
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from blora.engine.sampling_params import (
    LOGIT_BIAS_RANGE,
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORDS,
    MAX_INT32,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    REPETITION_PENALTY_RANGE,
    SEED_RANGE,
)

MAX_TOP_LOGPROBS = MAX_LOGPROBS
MAX_MIXTURE = 16
MAX_MIXTURE_WEIGHT = 100.0  # |w| per adapter: w scales its LoRA term, which must stay finite in float32

# The bounds are the engine's (``blora.engine.sampling_params``), so a request that passes here is one the
# engine can compute; token ids are further checked against the vocabulary before the engine sees them.
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]


# Sizes checked before the items are validated one by one, on the event loop (fail_fast: a union branch
# that does not match stops at its first bad item instead of listing an error per item; without it a
# 10-million-integer prompt took 40 s to refuse, 300,000 chat messages seconds).
MAX_PROMPTS = 256  # strings or token-id lists in one completions request (the server's prompts x n)
MAX_MESSAGES = 4096
MAX_TOOLS = 128
MAX_CONTENT_PARTS = 4096
Texts = Annotated[list[str], Field(fail_fast=True)]
Ids = Annotated[list[int], Field(fail_fast=True)]
IdLists = Annotated[list[Ids], Field(fail_fast=True)]


def _at_most(value: Any, limit: int, what: str) -> Any:
    if isinstance(value, list) and len(value) > limit:
        raise ValueError(f"at most {limit} {what}, got {len(value)}")
    return value


class OpenAIModel(BaseModel):
    """Base of the request models of the auxiliary routes: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")


class StrictModel(BaseModel):
    """Base of the generation requests: an unknown field is a 400 naming it (never silently ignored)."""

    model_config = ConfigDict(extra="forbid")


# Known fields blora does not implement: accepted only at their default value (a 400 naming the field
# otherwise), so a client that relies on them learns it instead of getting different output.
NOT_IMPLEMENTED: dict[str, Any] = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "early_stopping": False,
    "truncate_prompt_tokens": None,
    "logits_processors": None,
    "return_tokens_as_token_ids": False,
    "spaces_between_special_tokens": True,
    "cache_salt": None,
    "kv_transfer_params": None,
    "vllm_xargs": None,
    "guided_whitespace_pattern": None,
    "priority": 0,
}


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, usage so far in every chunk


class SamplingFields(StrictModel):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=64)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    response_format: dict[str, Any] | None = None
    # Bookkeeping (OpenAI): accepted, they do not change the output.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    request_id: str | None = None  # vLLM: the server names its requests itself
    # Extensions (vLLM's names): not in the OpenAI API, accepted by blora.
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT32)  # -1, 0 or >= vocabulary size: off
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(
        default=None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[TokenId] | None = Field(
        default=None, min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS
    )
    bad_words: list[str] | None = Field(default=None, max_length=MAX_BAD_WORDS)
    # per prompt token its logprob, rank and the top-k (vLLM's ``prompt_logprobs`` in the response)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Structured outputs (vLLM): one of these, or OpenAI's response_format (blora.server.structured_request).
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    # Known, not implemented: only the default value is accepted (NOT_IMPLEMENTED).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    truncate_prompt_tokens: int | None = None
    logits_processors: Any = None
    return_tokens_as_token_ids: bool = False
    spaces_between_special_tokens: bool = True
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    guided_whitespace_pattern: str | None = None
    priority: int = 0
    # blora extension: a weighted mixture of adapters for this request, e.g. {"sql": 0.7, "chat": 0.3};
    # ``model`` must then be the base model. Served as one adapter computing sum_i w_i * LoRA_i.
    adapter_mixture: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if any(not s for s in items):
            raise ValueError("stop strings must be non-empty")
        if len(items) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(
                f"at most {MAX_STOP_STRINGS} stop strings of up to {MAX_STOP_CHARS} characters each"
            )
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        low, high = LOGIT_BIAS_RANGE
        for key, bias in (value or {}).items():
            if not key.isdigit() or int(key) > MAX_INT32:
                raise ValueError(f"logit_bias keys must be token ids, got {key[:40]!r}")
            if not (math.isfinite(bias) and low <= bias <= high):
                raise ValueError(f"logit_bias values must be in [{low}, {high}]")
        return value

    @field_validator(*NOT_IMPLEMENTED)
    @classmethod
    def _not_implemented(cls, value: Any, info: Any) -> Any:
        default = NOT_IMPLEMENTED[info.field_name]
        if value != default:
            raise ValueError(
                f"{info.field_name} is not supported by blora; leave it unset (or {json.dumps(default)})"
            )
        return value

    @field_validator("guided_decoding_backend")
    @classmethod
    def _backend(cls, value: str | None) -> str | None:
        if value not in (None, "auto", "xgrammar"):
            raise ValueError(
                "blora's grammar engine is xgrammar: guided_decoding_backend may be 'auto' or 'xgrammar'"
            )
        return value

    @field_validator("adapter_mixture")
    @classmethod
    def _mixture(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if not 1 <= len(value) <= MAX_MIXTURE:
            raise ValueError(f"adapter_mixture must name 1 to {MAX_MIXTURE} adapters")
        if any(not (math.isfinite(w) and abs(w) <= MAX_MIXTURE_WEIGHT) for w in value.values()):
            raise ValueError(
                f"adapter_mixture weights must be numbers in [-{MAX_MIXTURE_WEIGHT}, {MAX_MIXTURE_WEIGHT}]"
            )
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available when stream is true (as in vLLM)")
        return self

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | Texts | Ids | IdLists
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _few_enough_prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            return _at_most(value, MAX_PROMPTS, "prompts")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value[0], list) and any(not ids for ids in value):
            raise ValueError("token-id prompts must not be empty")
        return value

    add_special_tokens: bool = True

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: Any) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of is not supported by blora (use n)")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (fill-in-the-middle) is not supported by blora")
        return value

    @field_validator("add_special_tokens")
    @classmethod
    def _special(cls, value: bool) -> bool:
        if not value:
            raise ValueError("add_special_tokens=false is not supported for completions; send token ids")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts as a list: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIModel):
    name: str
    arguments: str


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_CONTENT_PARTS)  # assistant
    tool_call_id: str | None = None  # tool
    refusal: str | None = None  # bookkeeping of an earlier assistant turn

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (tool-call arguments as objects where they parse)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _args(c)}}
                for c in self.tool_calls
            ]
        return out

    @field_validator("content", mode="before")
    @classmethod
    def _few_enough_parts(cls, value: Any) -> Any:
        return _at_most(value, MAX_CONTENT_PARTS, "content parts")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# Chat fields blora does not implement: accepted only at their default value.
CHAT_NOT_IMPLEMENTED: dict[str, Any] = {
    "audio": None,
    "functions": None,
    "function_call": None,
    "prediction": None,
    "reasoning_effort": None,
    "web_search_options": None,
    "verbosity": None,
    "echo": False,
    "continue_final_message": False,
    "documents": None,
    "mm_processor_kwargs": None,
}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    modalities: list[Literal["text"]] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    audio: Any = None
    functions: Any = None
    function_call: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    echo: bool = False
    continue_final_message: bool = False
    documents: Any = None
    mm_processor_kwargs: Any = None

    @field_validator(*CHAT_NOT_IMPLEMENTED)
    @classmethod
    def _chat_not_implemented(cls, value: Any, info: Any) -> Any:
        default = CHAT_NOT_IMPLEMENTED[info.field_name]
        if value != default:
            hint = " (use tools and tool_choice)" if info.field_name.startswith("function") else ""
            raise ValueError(f"{info.field_name} is not supported by blora{hint}; leave it unset")
        return value

    @field_validator("messages", mode="before")
    @classmethod
    def _few_enough_messages(cls, value: Any) -> Any:
        return _at_most(value, MAX_MESSAGES, "messages")

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def _now() -> int:
    return int(time.time())


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """One token's entry in ``prompt_logprobs`` (vLLM's shape)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# per prompt token (the first is null): {token id: entry} with the prompt token and the top-k
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=lambda v: v is None)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProb(TopLogProb):
    top_logprobs: list[TopLogProb] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[ChatLogProb] | None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=lambda v: v is None)


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "blora"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class LoadLoRAAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False  # replace an adapter of that name (requests on it finish on the old weights)


class UnloadLoRAAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1, max_length=256)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def _args(call: ToolCall) -> Any:
    """Tool-call arguments for a template: the parsed object, or the text if it is not JSON."""
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments
