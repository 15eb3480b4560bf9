"""``POST /v1/completions`` and ``POST /v1/chat/completions``: prompts in, OpenAI responses out.

The chat template is always the tokenizer's own: ``chat_template_kwargs`` only sets template variables, and
names that would replace the template (``chat_template``) or other arguments of the templating call are
refused. Output constraints (``response_format``, ``structured_outputs``, ``guided_*``) are compiled off the
event loop before the request reaches the engine (a bad one is a 400); ``tools`` are planned by
``blora.server.tools`` and rendered as OpenAI ``tool_calls``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import time
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from blora.engine.sampling_params import SamplingParamError, StructuredOutputsParams
from blora.server.errors import InvalidRequestError
from blora.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    PromptLogprob,
    PromptLogprobs,
    SamplingFields,
)
from blora.server.render import (
    StreamState,
    TextChunks,
    TokenText,
    ToolStream,
    chat_logprobs,
    completion_logprobs,
    tool_message,
    usage_of,
)
from blora.server.serving import Job, Serving
from blora.server.structured_request import compile_checked, structured_of
from blora.server.tools import ToolPlan, plan_tools

if TYPE_CHECKING:  # tokenization.py imports this module
    from blora.server.tokenization import TokenizeChatRequest


def sse(obj: Any) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


def engine_params(
    serving: Serving,
    req: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    structured: StructuredOutputsParams | None,
    source: str | None,
    prompt_logprobs: int | None = None,
) -> Any:
    """The engine's ``SamplingParams`` for ``req`` (the shared fields, then the vLLM extras);
    ``prompt_logprobs``: the engine's top-k per prompt token (default: the request's field)."""
    params = serving.sampling_params(req, max_tokens, logprobs)
    extras = dict(
        prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else req.prompt_logprobs,
        min_tokens=req.min_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        logit_bias={int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
        allowed_token_ids=req.allowed_token_ids,
        bad_words=req.bad_words,
        structured_outputs=structured,
    )
    try:
        return dataclasses.replace(params, **extras)
    except SamplingParamError as exc:
        param = source if exc.param.startswith("structured_outputs") and source else exc.param
        raise InvalidRequestError(f"Invalid sampling parameters: {exc}", param=param) from None


def prompt_logprobs_out(entries: list | None, k: int | None) -> PromptLogprobs | None:
    """The engine's prompt logprobs in the response (vLLM's shape), cut to the prompt token and rank <= k."""
    if entries is None or k is None:
        return None
    return [
        None
        if e is None
        else {
            tid: PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=lp.decoded_token)
            for i, (tid, lp) in enumerate(e.items())
            if i == 0 or (lp.rank is not None and lp.rank <= k)
        }
        for e in entries
    ]


def echo_logprobs(prompt_ids: list[int], entries: list | None, k: int, text: TokenText) -> CompletionLogProbs:
    """Legacy ``logprobs`` of the echoed prompt: its tokens, their logprobs (the first null), the top-k."""
    floats = [{} if e is None else {tid: lp.logprob for tid, lp in e.items()} for e in entries or []]
    out = completion_logprobs(prompt_ids, floats, k, text, 0)
    out.token_logprobs[0] = None
    out.top_logprobs[0] = None
    return out


def joined(a: CompletionLogProbs, b: CompletionLogProbs) -> CompletionLogProbs:
    return CompletionLogProbs(
        text_offset=a.text_offset + b.text_offset,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        tokens=a.tokens + b.tokens,
        top_logprobs=a.top_logprobs + b.top_logprobs,
    )


async def constraint(
    serving: Serving, req: SamplingFields
) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's output constraint, compiled (cached) off the event loop; 400 naming the field."""
    spec, source = structured_of(req)
    if spec is not None:
        await compile_checked(serving, spec, source or "structured_outputs")
    return spec, source


async def create_completion(serving: Serving, req: CompletionRequest) -> Any:
    raw = req.prompts()
    serving.check_choices(len(raw), req.n)
    serving.resolve(req)  # 404 before any tokenization work (resolved and pinned again in start)
    spec, source = await constraint(serving, req)
    prompts = await serving.prompt_ids(raw)
    k = req.logprobs
    echo_k = k if req.echo else None  # echo with logprobs: the prompt's logprobs come first
    engine_k = max((v for v in (echo_k, req.prompt_logprobs) if v is not None), default=None)
    params = [
        engine_params(serving, req, serving.check_length(ids, req.max_tokens), k, spec, source, engine_k)
        for ids, _ in prompts
    ]
    gen = await serving.start("cmpl", req, prompts, params, wait_first=not req.stream)
    text = TokenText(serving.tokenizer)

    def with_echo(job: Job, out: Any, generated: CompletionLogProbs) -> CompletionLogProbs:
        """``generated`` after the echoed prompt's logprobs (its offsets moved past the prompt)."""
        if echo_k is None:
            return generated
        echo = echo_logprobs(job.prompt_ids, out.prompt_logprobs, echo_k, text)
        shift = sum(len(t) for t in echo.tokens)
        generated.text_offset = [o + shift for o in generated.text_offset]
        return joined(echo, generated)

    def echo_text(job: Job) -> str:
        if not req.echo:
            return ""
        return job.prompt_text if job.prompt_text is not None else serving.tokenizer.decode(job.prompt_ids)

    if not req.stream:
        finals = await serving.collect(gen)
        choices = []
        for job, out in zip(gen.jobs, finals, strict=True):
            for comp in out.outputs:
                lp = None
                if k is not None:
                    lp = with_echo(
                        job, out, completion_logprobs(comp.token_ids, comp.logprobs or [], k, text, 0)
                    )
                choices.append(
                    CompletionChoice(
                        index=job.index * req.n + comp.index,
                        text=echo_text(job) + comp.text,
                        logprobs=lp,
                        finish_reason=comp.finish_reason or "stop",
                        prompt_logprobs=prompt_logprobs_out(out.prompt_logprobs, req.prompt_logprobs),
                    )
                )
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(id=gen.request_id, model=req.model, choices=choices, usage=usage_of(finals))

    created = int(time.time())  # one time for every chunk of the stream

    def chunk(choices: list[CompletionChoice], usage: Any = None) -> str:
        return sse(
            CompletionChunk(id=gen.request_id, created=created, model=req.model, choices=choices, usage=usage)
        )

    text_chunk = TextChunks(lambda i, t: chunk([CompletionChoice(index=i, text=t)]))

    def render(job: Job, state: StreamState, out: Any) -> list[str]:
        chunks = []
        for d in state.deltas(job.index, out):
            st = state.states[d.index]
            prefix = echo_text(job) if d.first else ""
            if k is None and not prefix and d.finish_reason is None:  # text only: the common chunk
                if d.text:
                    chunks.append(text_chunk(d.index, d.text))
                continue
            lp = None
            if k is not None:
                lp = completion_logprobs(d.token_ids, d.logprobs, k, text, st.text_offset)
                if d.first:
                    lp = with_echo(job, out, lp)
                st.text_offset = lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else st.text_offset
            if not (prefix or d.text or d.finish_reason or (lp and lp.tokens)):
                continue
            choice = CompletionChoice(
                index=d.index, text=prefix + d.text, logprobs=lp, finish_reason=d.finish_reason
            )
            chunks.append(chunk([choice]))
        return chunks

    def usage_chunk(usage: Any) -> str:
        return chunk([], usage)

    return serving.stream(gen, req.n, render, [], usage_chunk if req.include_usage() else None)


@functools.lru_cache(maxsize=8)
def _call_arguments(tokenizer_type: Any) -> frozenset[str]:
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
    reserved = sorted(_call_arguments(tokenizer.__class__) & kwargs.keys())
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


async def chat_prompt_ids(
    serving: Serving, req: ChatCompletionRequest | TokenizeChatRequest, plan: ToolPlan | None = None
) -> list[int]:
    """Token ids of the chat: bounded (messages, characters), then templated and tokenized off the loop.
    With ``plan`` (tool_choice "auto"), the tools go to the template, or into a system message."""
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
    messages = [m.template_dict() for m in req.messages]
    if plan is not None:
        messages, kwargs = with_tools(tok, plan, messages, kwargs)
    chars = sum(len(json.dumps(m)) for m in messages) + (len(json.dumps(kwargs)) if kwargs else 0)
    serving.check_chars(chars, "messages")
    return await serving.off_loop(chars, render_chat, tok, messages, req.add_generation_prompt, kwargs)


def with_tools(
    tokenizer: Any, plan: ToolPlan, messages: list[dict], kwargs: dict[str, Any]
) -> tuple[list[dict], dict[str, Any]]:
    """The messages and template variables that show ``plan``'s tools to the model (``auto`` only)."""
    tools = plan.template_tools(tokenizer)
    if tools is not None:
        return messages, {**kwargs, "tools": tools}
    prompt = plan.system_prompt(tokenizer)
    if prompt is None:
        return messages, kwargs
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
        return [first, *messages[1:]], kwargs
    return [{"role": "system", "content": prompt}, *messages], kwargs


async def chat_constraint(
    serving: Serving, req: ChatCompletionRequest, plan: ToolPlan
) -> tuple[StructuredOutputsParams | None, str | None]:
    spec, source = structured_of(req)
    tool_spec = plan.structured()
    if tool_spec is not None:
        if spec is not None:
            raise InvalidRequestError(
                f'tool_choice "{plan.mode}" constrains the output already; drop {source}', param=source
            )
        spec, source = tool_spec, "tools"
    if spec is not None:
        await compile_checked(serving, spec, source or "structured_outputs")
    return spec, source


async def create_chat_completion(serving: Serving, req: ChatCompletionRequest) -> Response | Any:
    serving.resolve(req)  # 404 before any templating work (resolved and pinned again in start)
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    spec, source = await chat_constraint(serving, req, plan)
    ids = await chat_prompt_ids(serving, req, plan)
    k = req.num_logprobs()
    params = engine_params(serving, req, serving.check_length(ids, req.token_limit()), k, spec, source)
    gen = await serving.start("chatcmpl", req, [(ids, None)], [params], wait_first=not req.stream)
    text = TokenText(serving.tokenizer)

    if not req.stream:
        (final,) = await serving.collect(gen)
        choices = []
        for comp in final.outputs:
            message, finish = tool_message(plan, comp.text, comp.finish_reason or "stop")
            lp = chat_logprobs(comp.token_ids, comp.logprobs or [], k, text) if k is not None else None
            choices.append(ChatChoice(index=comp.index, message=message, logprobs=lp, finish_reason=finish))
        choices.sort(key=lambda c: c.index)
        return ChatCompletionResponse(
            id=gen.request_id,
            model=req.model,
            choices=choices,
            usage=usage_of([final]),
            prompt_logprobs=prompt_logprobs_out(final.prompt_logprobs, req.prompt_logprobs),
        )

    created = int(time.time())  # one time for every chunk of the stream

    def chunk(choices: list[ChatStreamChoice], usage: Any = None) -> str:
        return sse(
            ChatCompletionChunk(
                id=gen.request_id, created=created, model=req.model, choices=choices, usage=usage
            )
        )

    text_chunk = TextChunks(lambda i, t: chunk([ChatStreamChoice(index=i, delta=DeltaMessage(content=t))]))

    opening = [
        chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        for i in range(req.n)
    ]

    tool_streams: dict[int, ToolStream] = {}

    def render(job: Job, state: StreamState, out: Any) -> list[str]:
        chunks = []
        for d in state.deltas(job.index, out):
            if k is None and not plan.active and d.finish_reason is None:  # text only: the common chunk
                if d.text:
                    chunks.append(text_chunk(d.index, d.text))
                continue
            lp = chat_logprobs(d.token_ids, d.logprobs, k, text) if k is not None else None
            if plan.active:
                stream = tool_streams.setdefault(d.index, ToolStream(plan))
                deltas, finish = stream.feed(d.text, d.finish_reason)
            else:
                deltas, finish = ([DeltaMessage(content=d.text)] if d.text else []), d.finish_reason
            if not (deltas or finish or (lp and lp.content)):
                continue
            deltas = deltas or [DeltaMessage()]
            for i, delta in enumerate(deltas):
                last = i == len(deltas) - 1
                choice = ChatStreamChoice(
                    index=d.index,
                    delta=delta,
                    logprobs=lp if i == 0 else None,
                    finish_reason=finish if last else None,
                )
                chunks.append(chunk([choice]))
        return chunks

    def usage_chunk(usage: Any) -> str:
        return chunk([], usage)

    return serving.stream(gen, req.n, render, opening, usage_chunk if req.include_usage() else None)
