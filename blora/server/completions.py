"""``POST /v1/completions`` and ``POST /v1/chat/completions``: prompts in, OpenAI responses out.

The chat template is always the tokenizer's own: ``chat_template_kwargs`` only sets template variables, and
names that would replace the template (``chat_template``) or other arguments of the templating call are
refused.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any

from starlette.responses import Response

from blora.server.errors import InvalidRequestError
from blora.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
)
from blora.server.render import DeltaTracker, TokenText, chat_logprobs, completion_logprobs, usage_of
from blora.server.serving import Job, Serving


def sse(obj: Any) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


async def create_completion(serving: Serving, req: CompletionRequest) -> Any:
    raw = req.prompts()
    serving.check_choices(len(raw), req.n)
    serving.resolve(req)  # 404 before any tokenization work (resolved and pinned again in start)
    prompts = await serving.prompt_ids(raw)
    params = [
        serving.sampling_params(req, serving.check_length(ids, req.max_tokens), req.logprobs)
        for ids, _ in prompts
    ]
    gen = await serving.start("cmpl", req, prompts, params, wait_first=not req.stream)
    text = TokenText(serving.tokenizer)
    k = req.logprobs

    def echo_text(job: Job) -> str:
        if not req.echo:
            return ""
        return job.prompt_text if job.prompt_text is not None else serving.tokenizer.decode(job.prompt_ids)

    if not req.stream:
        finals = await serving.collect(gen)
        choices = []
        for job, out in zip(gen.jobs, finals, strict=True):
            for comp in out.outputs:
                lp = (
                    completion_logprobs(comp.token_ids, comp.logprobs or [], k, text, 0)
                    if k is not None
                    else None
                )
                choices.append(
                    CompletionChoice(
                        index=job.index * req.n + comp.index,
                        text=echo_text(job) + comp.text,
                        logprobs=lp,
                        finish_reason=comp.finish_reason or "stop",
                    )
                )
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(id=gen.request_id, model=req.model, choices=choices, usage=usage_of(finals))

    def render(job: Job, tracker: DeltaTracker, out: Any) -> list[str]:
        chunks = []
        for d in tracker.deltas(job.index, out):
            st = tracker.states[d.index]
            prefix = echo_text(job) if d.first else ""
            lp = None
            if k is not None:
                lp = completion_logprobs(d.token_ids, d.logprobs, k, text, st.text_offset)
                st.text_offset += sum(len(t) for t in lp.tokens)
            if not (prefix or d.text or d.finish_reason or (lp and lp.tokens)):
                continue
            choice = CompletionChoice(
                index=d.index, text=prefix + d.text, logprobs=lp, finish_reason=d.finish_reason
            )
            chunks.append(sse(CompletionChunk(id=gen.request_id, model=req.model, choices=[choice])))
        return chunks

    def usage_chunk(usage: Any) -> str:
        return sse(CompletionChunk(id=gen.request_id, model=req.model, choices=[], usage=usage))

    return serving.stream(gen, req.n, render, [], usage_chunk if req.include_usage() else None)


@functools.lru_cache(maxsize=8)
def _call_arguments(tokenizer_type: type) -> frozenset[str]:
    """Names ``chat_template_kwargs`` may not use: ``apply_chat_template``'s own arguments (among them
    ``chat_template``, ``tools``, ``documents``) and the variables the call itself passes to the template."""
    params = inspect.signature(tokenizer_type.apply_chat_template).parameters
    named = {name for name, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return frozenset(named - {"self"} | {"messages"})


def template_kwargs(tokenizer: Any, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The client's template variables; 400 for any that would change the template or the call."""
    kwargs = kwargs or {}
    if "chat_template" in kwargs:
        raise InvalidRequestError(
            "chat_template_kwargs.chat_template is not allowed: the server applies the model's own chat "
            "template and clients cannot supply templates",
            param="chat_template_kwargs",
        )
    reserved = sorted(_call_arguments(type(tokenizer)) & kwargs.keys())
    if reserved:
        raise InvalidRequestError(
            f"chat_template_kwargs.{reserved[0]} is not allowed: chat_template_kwargs only sets template "
            "variables (use the request's own fields)",
            param="chat_template_kwargs",
        )
    return kwargs


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> list[int]:
    """Chat template then tokenization (runs in the preparation thread pool for large chats)."""
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as exc:  # template errors (e.g. roles the template refuses) are the caller's
        raise InvalidRequestError(f"Could not apply the chat template: {exc}", param="messages") from exc
    return tokenizer.encode(text, add_special_tokens=False)


async def chat_prompt_ids(serving: Serving, req: ChatCompletionRequest) -> list[int]:
    """Token ids of the chat: bounded (messages, characters), then templated and tokenized off the loop."""
    tok = serving.tokenizer
    if not getattr(tok, "chat_template", None):
        raise InvalidRequestError(
            "This model's tokenizer has no chat template; use /v1/completions", param="messages"
        )
    kwargs = template_kwargs(tok, req.chat_template_kwargs)
    limit = serving.max_model_len()
    if limit is not None and len(req.messages) > limit:
        raise InvalidRequestError(
            f"The chat has {len(req.messages):,} messages; this model's maximum context length is {limit:,} "
            "tokens (each message takes at least one). Please send fewer messages.",
            param="messages",
            code="context_length_exceeded",
        )
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    chars = sum(len(m["content"]) for m in messages) + (len(json.dumps(kwargs)) if kwargs else 0)
    serving.check_chars(chars, "messages")
    return await serving.off_loop(chars, render_chat, tok, messages, req.add_generation_prompt, kwargs)


async def create_chat_completion(serving: Serving, req: ChatCompletionRequest) -> Response | Any:
    serving.resolve(req)  # 404 before any templating work (resolved and pinned again in start)
    ids = await chat_prompt_ids(serving, req)
    k = req.num_logprobs()
    params = serving.sampling_params(req, serving.check_length(ids, req.token_limit()), k)
    gen = await serving.start("chatcmpl", req, [(ids, None)], [params], wait_first=not req.stream)
    text = TokenText(serving.tokenizer)

    if not req.stream:
        (final,) = await serving.collect(gen)
        choices = [
            ChatChoice(
                index=comp.index,
                message=ChatMessageOut(content=comp.text),
                logprobs=chat_logprobs(comp.token_ids, comp.logprobs or [], k, text)
                if k is not None
                else None,
                finish_reason=comp.finish_reason or "stop",
            )
            for comp in final.outputs
        ]
        choices.sort(key=lambda c: c.index)
        return ChatCompletionResponse(
            id=gen.request_id, model=req.model, choices=choices, usage=usage_of([final])
        )

    def chunk(choices: list[ChatStreamChoice], usage: Any = None) -> str:
        return sse(ChatCompletionChunk(id=gen.request_id, model=req.model, choices=choices, usage=usage))

    opening = [
        chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        for i in range(req.n)
    ]

    def render(job: Job, tracker: DeltaTracker, out: Any) -> list[str]:
        chunks = []
        for d in tracker.deltas(job.index, out):
            lp = chat_logprobs(d.token_ids, d.logprobs, k, text) if k is not None else None
            if not (d.text or d.finish_reason or (lp and lp.content)):
                continue
            delta = DeltaMessage(content=d.text) if d.text else DeltaMessage()
            chunks.append(
                chunk(
                    [ChatStreamChoice(index=d.index, delta=delta, logprobs=lp, finish_reason=d.finish_reason)]
                )
            )
        return chunks

    def usage_chunk(usage: Any) -> str:
        return chunk([], usage)

    return serving.stream(gen, req.n, render, opening, usage_chunk if req.include_usage() else None)
