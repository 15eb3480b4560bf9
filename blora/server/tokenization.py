"""``POST /tokenize`` and ``POST /detokenize`` with vLLM's request and response shapes.

``/tokenize`` takes a completion prompt (``prompt``) or a chat (``messages``, rendered with the chat template
as ``/v1/chat/completions`` renders it) and returns ``{"count", "max_model_len", "tokens"}`` (and
``"token_strs"`` with ``return_token_strs``); ``/detokenize`` takes ``{"tokens": [...]}`` and returns
``{"prompt": text}``. ``model`` is optional; when given it must be a served model (404 otherwise). Inputs are
bounded as the generation endpoints bound them (characters before tokenizing, token ids in the vocabulary).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from blora.engine.sampling_params import SamplingParamError
from blora.engine.validation import check_token_ids
from blora.server.completions import chat_prompt_ids
from blora.server.errors import InvalidRequestError
from blora.server.protocol import MAX_MESSAGES, ChatMessage, Ids, OpenAIModel
from blora.server.serving import Serving

MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeCompletionRequest(OpenAIModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: Ids = Field(max_length=MAX_DETOKENIZE_TOKENS)


class DetokenizeResponse(BaseModel):
    prompt: str


def _check_model(serving: Serving, model: str | None) -> None:
    if model is not None:
        serving.adapters.resolve(model)  # 404 naming the known models


async def tokenize(
    serving: Serving, req: TokenizeCompletionRequest | TokenizeChatRequest
) -> TokenizeResponse:
    _check_model(serving, req.model)
    tok = serving.tokenizer
    if isinstance(req, TokenizeChatRequest):
        if req.continue_final_message:
            raise InvalidRequestError(
                "continue_final_message is not supported; use add_generation_prompt",
                param="continue_final_message",
            )
        ids = await chat_prompt_ids(serving, req)
        bos = getattr(tok, "bos_token_id", None) if req.add_special_tokens else None
        if bos is not None and (not ids or ids[0] != bos):  # the BOS the template did not write
            ids = [bos, *ids]
    else:
        serving.check_chars(len(req.prompt), "prompt")
        add = req.add_special_tokens
        ids = await serving.off_loop(
            len(req.prompt), lambda: list(tok.encode(req.prompt, add_special_tokens=add))
        )
    strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=serving.max_model_len(), tokens=ids, token_strs=strs
    )


async def detokenize(serving: Serving, req: DetokenizeRequest) -> DetokenizeResponse:
    _check_model(serving, req.model)
    try:  # the engine's rule (ids it can read or sample; unknown to the tokenizer: decoded as "")
        check_token_ids("tokens", req.tokens, serving.engine.limits.vocab_size, "token ids")
    except SamplingParamError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
    text = await serving.off_loop(len(req.tokens), serving.tokenizer.decode, req.tokens)
    return DetokenizeResponse(prompt=text)
