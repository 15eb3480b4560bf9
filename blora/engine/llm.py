"""``LLM``: the synchronous, offline API over the engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from blora.engine.llm_engine import EngineConfig, LLMEngine
from blora.engine.lora_request import (
    LoRARequest,
    LoRARequestRegistry,
    adapter_names,
    per_prompt_requests,
)
from blora.engine.outputs import RequestOutput, RequestOutputKind
from blora.engine.sampling_params import SamplingParams
from blora.models import LoadedModel, load_model

Prompt = str | list[int]


def build_engine(
    model=None,
    *,
    tokenizer=None,
    adapters: dict[str, str] | None = None,
    dtype=None,
    device=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    enable_lora: bool = True,
    **config,
) -> LLMEngine:
    """An engine over ``model``: None (embedded default), a path / hub id / .gguf file, a ``LoadedModel``,
    or an already-built HF model (then pass ``tokenizer``). ``config``: ``EngineConfig`` fields.
    ``tokenizer``: a tokenizer, or where to load one from (default: the model's); ``revision`` and
    ``trust_remote_code`` as in ``from_pretrained``; ``chat_template`` replaces the tokenizer's.
    ``enable_lora``: accepted for vLLM compatibility (``LLM(model, enable_lora=True)``); adapters are always
    enabled, so it changes nothing."""
    source = str(tokenizer) if isinstance(tokenizer, (str, Path)) else None
    if model is None or isinstance(model, (str, Path)):
        model = load_model(
            None if model is None else str(model), dtype=dtype, device=device, tokenizer=source,
            revision=revision, trust_remote_code=trust_remote_code,
        )  # fmt: skip
    elif source is not None:
        raise ValueError("tokenizer= as a path needs model= as a path too (or pass a tokenizer object)")
    if isinstance(model, LoadedModel):
        own = model.tokenizer if source is not None else tokenizer or model.tokenizer
        model, tokenizer = model.model, own
    if tokenizer is None:
        raise ValueError("pass tokenizer= together with an already-built model")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    model.eval()
    return LLMEngine(model, tokenizer, EngineConfig(**config), adapters=adapters)


class LLM:
    """Batched multi-LoRA generation with continuous batching.

    >>> llm = LLM(adapters={"sql": "path/to/peft_dir"}, dtype="float32")
    >>> outs = llm.generate(["Hi", "SELECT"], SamplingParams(max_tokens=32, temperature=0), adapters=[None, "sql"])
    >>> outs[1].outputs[0].text
    """

    def __init__(
        self,
        model=None,
        adapters: dict[str, str] | None = None,
        dtype=None,
        device=None,
        max_loras: int = EngineConfig.max_loras,
        max_num_seqs: int = EngineConfig.max_num_seqs,
        max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens,
        num_kv_blocks: int | None = None,
        block_size: int = EngineConfig.block_size,
        max_model_len: int | None = None,
        seed: int = EngineConfig.seed,
        tokenizer=None,
        **engine_config,
    ) -> None:
        self.engine = build_engine(
            model,
            tokenizer=tokenizer,
            adapters=adapters,
            dtype=dtype,
            device=device,
            max_loras=max_loras,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            num_kv_blocks=num_kv_blocks,
            block_size=block_size,
            max_model_len=max_model_len,
            seed=seed,
            **engine_config,
        )
        self._lora_requests = LoRARequestRegistry()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def load_adapter(self, name: str, path: str | Path, replace: bool = False) -> None:
        """Register and validate now; ``replace=True`` swaps an adapter of the same name."""
        self.engine.load_adapter(name, path, replace=replace)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def list_adapters(self) -> dict[str, str]:
        return self.engine.list_adapters()

    def adapter_source(self, name: str) -> str | None:
        """Where the adapter ``name`` is served from, or None if it is not."""
        return self.engine.adapter_source(name)

    def stats(self) -> dict:
        """The engine's counters and state (``LLMEngine.stats``), e.g. ``prefix_cache_hit_rate``."""
        return self.engine.stats()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt block, so the next ``generate`` computes its prompts from scratch (a
        cold start: benchmarks that repeat prompts call it between timed runs). True once done (always
        between ``generate`` calls)."""
        return self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | dict | Sequence[str | dict | None] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns the final outputs in prompt order. ``adapters``: one per
        prompt or one for all: a name, None (base model) or a weighted mixture ``{"a": 0.5, "b": 0.5}``
        (the weighted sum of the adapters' LoRA terms, computed in the batch). ``lora_request``: vLLM's
        way instead (``LoRARequest(name, int_id, path)``, one or one per prompt; loaded on first use)."""
        adapters = self._lora_adapters(lora_request, adapters, prompts)
        return self._run_final(self._add(prompts, sampling_params, adapters))

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | dict | Sequence[str | dict | None] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield each request's output whenever it progresses (``delta_text`` holds what is new)."""
        yield from self._run(
            self._add(prompts, sampling_params, adapters, output_kind=RequestOutputKind.CUMULATIVE)
        )

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | dict | Sequence[str | dict | None] | None = None,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """``generate`` on conversations rendered with the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        adapters = self._lora_adapters(lora_request, adapters, conversations)
        prompts = [
            self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            for conv in conversations
        ]
        return self._run_final(self._add(prompts, sampling_params, adapters, add_special_tokens=False))

    def _lora_adapters(self, lora_request, adapters, prompts):
        """``adapters`` from ``lora_request`` (loading what is new), or ``adapters`` as given."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        requests = per_prompt_requests(lora_request, adapters, 1 if single else len(prompts))
        if requests is None:
            return adapters
        return adapter_names(requests, self._lora_requests, self.adapter_source, self.load_adapter)

    def _add(
        self,
        prompts,
        sampling_params,
        adapters,
        add_special_tokens: bool = True,
        output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY,
    ) -> list[str]:
        """Queue one request per prompt (none if any is refused); ``output_kind``: ``FINAL_ONLY`` for
        ``generate``/``chat``, which read only the final outputs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = _per_prompt(sampling_params, len(prompts), "sampling_params", SamplingParams)
        if isinstance(adapters, dict):  # one mixture {"a": 0.5, "b": 0.5} for every prompt
            adapters = [adapters] * len(prompts)
        names = _per_prompt(adapters, len(prompts), "adapters", str)
        ids = []
        try:
            for prompt, p, name in zip(prompts, params, names, strict=True):
                ids.append(
                    self.engine.add_request(
                        None, prompt, p, name, add_special_tokens=add_special_tokens, output_kind=output_kind
                    )
                )
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id, quiet=True)
            raise
        return ids

    def _run_final(self, ids: list[str]) -> list[RequestOutput]:
        """Run the requests ``ids`` to the end; their final outputs in that order."""
        final = {out.request_id: out for out in self._run(ids) if out.finished}
        return [final[i] for i in ids]

    def _run(self, ids: list[str]) -> Iterator[RequestOutput]:
        wanted = set(ids)
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in wanted:
                        if out.error is not None:
                            raise out.error
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for request_id in pending:  # the caller stopped iterating early
                self.engine.abort_request(request_id)


def _per_prompt(value, n: int, name: str, single_type) -> list:
    if value is None or isinstance(value, single_type):
        return [value if value is not None or single_type is str else SamplingParams()] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} prompts; pass one, or one per prompt")
    return value
