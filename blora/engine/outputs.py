"""What the engine hands back per request: the full output so far plus what is new since the last one."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestOutputKind(enum.Enum):
    """Which outputs of a request the engine emits (vLLM's name). ``CUMULATIVE``: one after every step
    that made progress (each with the full output so far and its increment); ``FINAL_ONLY``: only the
    last one (its ``delta_*`` fields then hold everything, like its cumulative ones)."""

    CUMULATIVE = "cumulative"
    FINAL_ONLY = "final_only"


@dataclass
class Logprob:
    """One token's entry in ``RequestOutput.prompt_logprobs`` (vLLM's shape): its log-probability under the
    model, its rank among the vocabulary (1 = most likely) and its text decoded alone."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per prompt position: None for the first token, then {token_id: Logprob} with the prompt token and the top-k.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One completion (of ``n``) of a request.

    ``text``/``token_ids``: everything generated so far (text never contains a stop string, nor a partial
    one that may still become a stop string). ``delta_text``/``delta_token_ids``/``delta_logprobs``: what is
    new since the previous output of this request (in its first output: everything so far); the engine
    emits each increment exactly once. ``logprobs``: per generated token a dict
    ``{token_id: logprob}`` holding the sampled token and the top-k (only when requested).
    ``finish_reason``: "stop" | "length" | "abort" | None while running; ``stop_reason``: the stop string
    or stop token id that ended it (None for EOS).
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.time()``) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None  # first engine step that ran it (queue time ends)
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """The state of one request after an engine step; ``finished`` is True on its last output.
    ``error``: why a request ended early (e.g. its adapter failed to load); ``LLM``/``AsyncLLM`` raise it.
    ``prompt_logprobs``: with ``SamplingParams(prompt_logprobs=k)``, per prompt token (the first is None) a
    dict ``{token_id: Logprob}`` holding the prompt token and the top-k; in every output once computed."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    adapter: str | None
    metrics: RequestMetrics
    error: Exception | None = None
    prompt_logprobs: PromptLogprobs | None = None
