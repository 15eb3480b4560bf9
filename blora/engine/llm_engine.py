"""The engine loop: add requests, ``step()`` (schedule -> run -> sample -> update), collect outputs.

Single-threaded by design: ``LLM`` calls it directly, ``AsyncLLM`` drives it from one background thread.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from blora import kernels
from blora.engine.block_manager import BlockManager
from blora.engine.detokenizer import IncrementalDetokenizer
from blora.engine.model_runner import ModelRunner
from blora.engine.outputs import RequestMetrics, RequestOutput, RequestOutputKind
from blora.engine.sampler import Sampler
from blora.engine.sampling_params import SamplingParams
from blora.engine.scheduler import (
    ScheduledSeq,
    SchedulePlan,
    Scheduler,
    SchedulerConfig,
    StepResults,
    StopRules,
)
from blora.engine.sequence import Request, Sequence, SequenceStatus
from blora.engine.validation import check_prompt_ids, check_token_ids, resolve_max_tokens
from blora.lora.manager import LoraManager
from blora.lora.mixtures import mixture_key
from blora.lora.store import AdapterStore, StoreConfig
from blora.models.quant import quantize_model

log = logging.getLogger(__name__)

# Default KV cache budget when num_kv_blocks is not given: this many bytes on CPU, this share of free
# memory on CUDA; never more than max_num_seqs full-length sequences need.
CPU_KV_BYTES = 2 << 30
CUDA_KV_FRACTION = 0.5


class RequestFailedError(RuntimeError):
    """A request ended because something failed inside an engine step while it ran (its ``__cause__``
    says what); only that request ended, the others kept running."""


@dataclass
class EngineConfig:
    """Engine limits. ``max_loras``: distinct adapters running at once; ``max_num_batched_tokens``: tokens
    per step (prefill chunk size); ``num_kv_blocks``: KV cache size in blocks of ``block_size`` tokens
    (None: sized from memory); ``max_model_len``: prompt + generated tokens per sequence.
    Adapter store (``blora.lora.store``): ``adapter_root`` (a directory or list of them whose sub-folders
    are adapters, resolved by name on first use), ``cpu_cache_bytes`` (host cache of prepared adapters),
    ``prefetch_depth`` (distinct adapters of waiting requests loaded ahead; default ``max_loras``).
    ``enable_prefix_caching``: reuse the K/V of full blocks of earlier requests with the same leading tokens
    and the same adapter (``blora.engine.block_manager``). ``stream_interval``: a streaming request's outputs
    carry this many new tokens each (its first token and its end come at once): fewer, larger outputs cost
    the server less per token (vLLM's ``--stream-interval``)."""

    max_loras: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    num_kv_blocks: int | None = None
    block_size: int = 16
    max_model_len: int | None = None
    seed: int = 0
    max_lora_rank: int | None = None
    max_adapter_wait_steps: int = 16
    adapter_root: str | Path | list[str | Path] | None = None
    cpu_cache_bytes: int = 2 << 30
    max_cpu_loras: int | None = None  # adapters in the host cache (None: bounded by cpu_cache_bytes only)
    prefetch_depth: int | None = None
    enable_prefix_caching: bool = True
    stream_interval: int = 1
    # How the forward runs (docs/engine.md), resolved once when the engine starts:
    lora_backend: str = "auto"  # "auto", "cpu" (C++ kernel + GEMMs), "torch", ... (blora.lora.backends)
    cpu_kernel: bool = True  # the C++ kernels (LoRA, decode attention, fast path); False: PyTorch ops only
    attention_backend: str = "auto"  # decode attention: "auto", "cpu", "torch", "triton" (engine.attention)
    lora_kernel_max_work: int = (
        kernels.MAX_WORK
    )  # tokens x rank per adapter via the LoRA kernel (above: GEMMs)
    fast_path: Literal["auto", "on", "off"] = "auto"  # a model family's own forward (blora.models.families)
    packed_weights: bool = True  # the fast path's oneDNN-prepacked GEMM weights
    fused_lora_kernel_max_work: int = kernels.FUSED_MAX_WORK  # the fast path's LoRA kernel bound
    quantization: str | None = (
        None  # "int8" / "int4": weight-only base linears, in place (blora.models.quant)
    )


class LLMEngine:
    """Continuous-batching multi-LoRA engine over one Hugging Face causal LM (already loaded)."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, adapters=None) -> None:
        self.config = config = config or EngineConfig()
        if config.stream_interval < 1:
            raise ValueError(
                f"stream_interval must be >= 1 (tokens per streamed output), got {config.stream_interval}"
            )
        if config.quantization is not None:  # before anything reads or wraps the base linears
            quantize_model(model, config.quantization, kernel=config.cpu_kernel)
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len, num_blocks = size_kv_cache(model, config)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        sched = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_loras=config.max_loras,
            max_adapter_wait_steps=config.max_adapter_wait_steps,
        )
        self.vocab_size = model.get_input_embeddings().num_embeddings
        stop = StopRules(eos_token_ids(model, tokenizer), self.max_model_len, self.vocab_size)
        self.scheduler = Scheduler(
            sched, self.block_manager, stop, can_admit=self._can_admit, cache_identity=self._cache_identity
        )
        self.runner = ModelRunner.from_config(model, num_blocks, config)
        self.sampler = Sampler(self.runner.device, config.seed)
        self.sampler.configure(tokenizer, self.vocab_size, sorted(stop.eos_token_ids))  # grammars, bad_words
        self.requests: dict[str, Request] = {}
        roots = config.adapter_root
        store_config = StoreConfig(
            max_loras=config.max_loras,
            cpu_cache_bytes=config.cpu_cache_bytes,
            max_cpu_loras=config.max_cpu_loras,
            prefetch_depth=config.prefetch_depth,
            max_rank=config.max_lora_rank,
            roots=tuple(roots if isinstance(roots, (list, tuple)) else [roots] if roots else []),
        )
        self.store = AdapterStore(LoraManager.attach(model), store_config)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_preemptions_total = 0
        self._pending: list[RequestOutput] = []
        self._order = itertools.count()
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        for name, path in (adapters or {}).items():
            self.register_adapter(name, path)

    @property
    def eos_token_ids(self) -> set[int]:
        """The token ids that end a sequence (unless ``ignore_eos``): the tokenizer's and the model's."""
        return self.scheduler.stop.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: set[int]) -> None:
        self.scheduler.stop.eos_token_ids = set(ids)

    # -- adapters ----------------------------------------------------------------------------------
    def register_adapter(self, name: str, path: str | Path) -> None:
        """Make adapter ``name`` available; its weights load when a request first uses it."""
        self.store.register(name, path)

    def load_adapter(
        self, name: str, path: str | Path, replace: bool = False, wait: bool = False, prepared=None
    ):
        """Register and read + validate now, so a broken adapter fails here (``AdapterError``, a
        ``ValueError``). ``replace=True`` swaps an existing adapter: refused while requests use it
        (``AdapterInUseError``), or with ``wait=True`` done when they finish (returns a ``Future`` then).
        ``prepared``: ``store.prepare(name, path)`` done in another thread (then nothing is read here)."""
        return self.store.load(name, path, replace=replace, wait=wait, prepared=prepared)

    def unload_adapter(self, name: str, wait: bool = False):
        """Forget an adapter. While unfinished requests use it: ``AdapterInUseError`` (a ``ValueError``), or
        with ``wait=True`` a ``Future`` done once they have finished (new requests for it are refused)."""
        return self.store.unload(name, wait=wait)

    def list_adapters(self) -> dict[str, str]:
        return self.store.list()

    def adapter_source(self, name: str) -> str | None:
        """Where the adapter ``name`` is served from, or None if it is not (one name: no root scan)."""
        return self.store.lookup(name)

    @property
    def adapter_paths(self) -> dict[str, str]:
        return self.store.list()

    def _cache_identity(self, name: str | None) -> str:
        """The adapter part of prefix-cache keys: its name and weight version (none for base rows)."""
        return "" if name is None else "adapter:" + self.store.identity(name)

    def _can_admit(self, seq: Sequence) -> bool:
        return seq.adapter is None or self.store.ready(seq.adapter, seq.request.request_id)

    def _fail_unloadable(self) -> None:
        """Requests waiting for an adapter whose background load failed end with that error."""
        failures = self.store.take_failures()
        for req in list(self.requests.values()):
            error = failures.get(req.adapter) if req.adapter is not None else None
            if error is not None and not any(seq.status is SequenceStatus.RUNNING for seq in req.seqs):
                self.abort_request(req.request_id, error=error)

    def _prefetch(self) -> None:
        self.store.prefetch(s.adapter for s in self.scheduler.waiting if s.adapter is not None)

    # -- requests ----------------------------------------------------------------------------------
    def tokenize(
        self, prompt: str | list[int], add_special_tokens: bool = True
    ) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids), checked against the vocabulary."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            text = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids, text = list(prompt), None
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        check_prompt_ids(ids, self.vocab_size)  # the server's rule too (blora.engine.validation)
        return text, ids

    def check_params(self, params: SamplingParams) -> None:
        """Validate sampling settings for this model (``ValueError``, a ``SamplingParamError`` naming the
        field). Reads only constants of the engine, so any thread may call it."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params.validate()  # again: its fields may have been changed since it was built
        for name in ("stop_token_ids", "logit_bias", "allowed_token_ids"):
            check_token_ids(name, getattr(params, name) or (), self.vocab_size)
        self.sampler.check(params)  # compiles its grammar (cached), tokenizes its bad_words

    def check_request(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> int:
        """Validate a request before it is queued; returns its effective max_tokens."""
        self.check_params(params)
        if adapter is not None:
            self.store.source(adapter)  # AdapterError (a ValueError): "unknown adapter ..."
        return resolve_max_tokens(len(prompt_ids), params.max_tokens, self.max_model_len)

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | dict[str, float] | None = None,
        arrival_time: float | None = None,
        add_special_tokens: bool = True,
        prompt_token_ids: list[int] | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
    ) -> str:
        """Queue a request (validated here, ``ValueError`` if invalid); returns its id.
        ``prompt_token_ids``, when given, are used instead of tokenizing the ``prompt`` text.
        ``adapter``: a name, None (base model) or a weighted mixture ``{"a": 0.5, "b": 0.5}``.
        ``output_kind``: an output after every step that made progress (``CUMULATIVE``) or only the final
        one (``FINAL_ONLY``, when nobody reads the intermediate ones)."""
        params = params if params is not None else SamplingParams()
        adapter = mixture_key(adapter)  # {"a": 0.5, "b": 0.5} -> one adapter name for the mixture
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
        if prompt_token_ids is not None:
            text, ids = (prompt if isinstance(prompt, str) else None), self.tokenize(prompt_token_ids)[1]
        else:
            text, ids = self.tokenize(prompt, add_special_tokens)
        max_tokens = self.check_request(ids, params, adapter)
        req = Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            adapter=adapter,
            order=next(self._order),
            max_tokens=max_tokens,
            metrics=RequestMetrics(arrival_time=arrival_time or time.time()),
            output_kind=RequestOutputKind(output_kind),
        )
        for index in range(params.n):
            req.seqs.append(self._new_sequence(req, index))
        if adapter is not None:  # last: nothing after it can refuse the request and leave the adapter pinned
            self.store.acquire(adapter, request_id)
        self.requests[request_id] = req
        for seq in req.seqs:
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(ids)
        return request_id

    def _new_sequence(self, req: Request, index: int) -> Sequence:
        generator = None
        if req.params.seed is not None:
            generator = torch.Generator(device=self.runner.device)
            generator.manual_seed((req.params.seed + index) % 2**64)  # manual_seed takes a uint64
        return Sequence(
            seq_id=next(self._seq_ids),
            request=req,
            index=index,
            token_ids=list(req.prompt_token_ids),
            detokenizer=IncrementalDetokenizer(
                self.tokenizer,
                req.prompt_token_ids,
                req.params.stop_strings,
                include_stop=req.params.include_stop_str_in_output,
                skip_special_tokens=req.params.skip_special_tokens,
            ),
            generator=generator,
            logprobs=[] if req.params.logprobs is not None else None,
            cumulative_logprob=0.0 if req.params.logprobs is not None else None,
            prompt_logprobs=[None] if req.params.prompt_logprobs is not None and index == 0 else None,
        )

    def _decode_each(self, token_ids: list[int]) -> list[str]:
        """Each token's text decoded alone (``Logprob.decoded_token``)."""
        return self.tokenizer.batch_decode([[t] for t in token_ids])

    def abort_request(self, request_id: str, quiet: bool = False, error: Exception | None = None) -> bool:
        """Stop a request now and free its blocks; its final output (finish_reason "abort", with ``error``
        if given) comes with the next ``step()`` (unless ``quiet``). False if unknown or already finished."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return False
        req.error = error
        self._release(req)
        for seq in req.seqs:
            self.scheduler.abort(seq)
        req.metrics.finished_time = time.time()
        if not quiet:
            self._pending.append(req.take_output())
        return True

    def _release(self, req: Request) -> None:
        if req.adapter is not None:
            self.store.release(req.adapter, req.request_id)

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache's blocks (``BlockManager.reset_prefix_cache``); False, changing nothing,
        while requests hold blocks."""
        return self.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    # -- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the outputs of requests that progressed (or were aborted): one
        per request, holding its increment since its previous output (``FINAL_ONLY`` requests: only their
        final output).

        A request that fails inside the step (installing its adapter, its forward, its sampling, its token
        update) ends alone with ``RequestFailedError`` as its output's ``error``; the others progress as
        they would have. Each failure path runs only after a failure: the normal path is unchanged.
        """
        self._fail_unloadable()
        outputs, self._pending = self._pending, []
        self._prefetch()
        plan = self.scheduler.schedule()
        self.num_preemptions_total += len(plan.preempted)
        if not plan.scheduled:
            if self.scheduler.waiting and self.store.loading():
                self.store.wait_for_load(0.02)  # nothing to run until an adapter arrives: don't spin
            return outputs
        outputs += self._activate(plan)
        if not plan.scheduled:
            return outputs
        now = time.time()
        for s in plan.scheduled:  # queue time ends at a request's first step (metrics)
            if s.seq.request.metrics.first_scheduled_time is None:
                s.seq.request.metrics.first_scheduled_time = now
        try:
            logits = self.runner.execute(plan.scheduled)
        except Exception as exc:
            return outputs + self._run_isolated(plan.scheduled, exc)
        return outputs + self._update(plan, logits)

    def _activate(self, plan: SchedulePlan) -> list[RequestOutput]:
        """Install the plan's adapters in device slots and write each chunk's slot into the plan. If that
        fails, each adapter is installed alone; the requests of one that still fails end with its error
        and leave the plan (their outputs returned)."""
        busy = set(self.scheduler.running_adapters())
        try:
            self.store.activate(plan.adapters, busy)
            failed: list[RequestOutput] = []
        except Exception as exc:
            log.warning("installing the step's adapters failed (%r); installing each alone", exc)
            failed = self._activate_each(plan, busy)
        slots = {name: self.store.slot(name) for name in plan.adapters}
        for s in plan.scheduled:
            s.slot = -1 if s.seq.adapter is None else slots[s.seq.adapter]
        return failed

    def _activate_each(self, plan: SchedulePlan, busy: set[str]) -> list[RequestOutput]:
        """The failure path of ``_activate``: each adapter alone; the requests of those that fail end."""
        bad: dict[str, Exception] = {}
        for name in plan.adapters:
            try:
                self.store.activate([name], busy)
            except Exception as exc:
                bad[name] = exc
        failed = {
            s.seq.request.request_id: (s.seq.request, bad[s.seq.adapter])
            for s in plan.scheduled
            if s.seq.adapter in bad
        }
        plan.scheduled = [s for s in plan.scheduled if s.seq.request.request_id not in failed]
        return self._fail_requests(failed)

    def _run_isolated(self, scheduled: list[ScheduledSeq], exc: Exception) -> list[RequestOutput]:
        """The failure path of a step whose forward raised: the forward cannot tell which row caused it,
        so each request's chunks run again alone (K/V writes are idempotent: same slots, same values). A
        request whose own forward fails ends with that error; the others progress as in the batch."""
        groups: dict[str, list[ScheduledSeq]] = {}
        for s in scheduled:
            groups.setdefault(s.seq.request.request_id, []).append(s)
        if len(groups) == 1:
            return self._fail_requests({s.seq.request.request_id: (s.seq.request, exc) for s in scheduled})
        log.warning(
            "the forward of a %d-request step failed (%r); running each request alone", len(groups), exc
        )
        outputs: list[RequestOutput] = []
        for group in groups.values():
            try:
                logits = self.runner.execute(group)
            except Exception as group_exc:
                req = group[0].seq.request
                outputs += self._fail_requests({req.request_id: (req, group_exc)})
                continue
            outputs += self._update(SchedulePlan(scheduled=group), logits)
        return outputs

    def _update(self, plan: SchedulePlan, logits: torch.Tensor) -> list[RequestOutput]:
        """Sample, hand the step's results to the scheduler (which makes every sequence transition), then
        end the finished requests and emit the outputs of those that progressed."""
        sampled = plan.sampled
        samples = self.sampler(logits, sampled) if sampled else []  # a row that fails has .error set
        results = StepResults(samples, self.runner.prompt_logprobs, self._decode_each)
        update = self.scheduler.update(plan, results)
        self.generation_tokens_total += update.num_generated
        outputs = self._fail_requests(update.failed)
        now = time.time()
        interval = self.config.stream_interval
        for req in update.progressed.values():
            req.metrics.first_token_time = req.metrics.first_token_time or now
            if req.finished:
                req.metrics.finished_time = now
                self.requests.pop(req.request_id, None)
                self._release(req)
            if req.finished or (req.streams and (interval == 1 or req.stream_due(interval))):
                outputs.append(req.take_output())
        return outputs

    def _fail_requests(self, failed: dict[str, tuple[Request, Exception]]) -> list[RequestOutput]:
        """End each request with a ``RequestFailedError`` (caused by its exception) as its final output."""
        outputs = []
        for request_id, (req, exc) in failed.items():
            log.warning("request %s failed in an engine step: %r", request_id, exc)
            error = RequestFailedError(
                f"request {request_id} failed in the engine step ({type(exc).__name__}: {exc}); "
                "the other requests were not affected"
            )
            error.__cause__ = exc
            if self.abort_request(request_id, quiet=True, error=error):
                outputs.append(req.take_output())
        return outputs

    # -- introspection -----------------------------------------------------------------------------
    def stats(self) -> dict:
        residency = self.store.residency()
        running = {s.request.request_id for s in self.scheduler.running}
        waiting = {s.request.request_id for s in self.scheduler.waiting} - running
        return {
            "num_running": len(running),
            "num_waiting": len(waiting),
            "kv_usage": self.block_manager.usage,
            "running_adapters": dict(self.scheduler.running_adapters()),
            "waiting_adapters": dict(self.scheduler.waiting_adapters()),
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "num_preemptions_total": self.num_preemptions_total,
            "prefix_cache_queries_total": self.block_manager.stats.queries,
            "prefix_cache_hits_total": self.block_manager.stats.hits,
            "prefix_cache_hit_rate": self.block_manager.stats.hit_rate,
            "adapters_active": len(residency.active),
            "adapters_cached": len(residency.cached),
        }

    def adapter_stats(self) -> dict:
        """The adapter store's tiers, hit counts, load latencies and memory (``AdapterStore.stats`` as a
        dict)."""
        return self.store.stats().as_dict()


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (which may list several)."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(gen, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def kv_bytes_per_token(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * elem


def size_kv_cache(model, config: EngineConfig) -> tuple[int, int]:
    """(max_model_len, num_kv_blocks) from the config, the model's position limit and memory."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(cfg, "max_position_embeddings", None) or 2048
    max_len = config.max_model_len or limit
    if max_len > limit:
        raise ValueError(f"max_model_len={max_len} is above the model's max_position_embeddings ({limit})")
    bs = config.block_size
    num_blocks = config.num_kv_blocks
    if num_blocks is None:
        device = next(model.parameters()).device
        budget = CPU_KV_BYTES
        if device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(device)[0] * CUDA_KV_FRACTION)
        by_memory = budget // (kv_bytes_per_token(model) * bs)
        num_blocks = max(1, min(by_memory, math.ceil(config.max_num_seqs * max_len / bs)))
    if num_blocks * bs < max_len:
        if config.max_model_len is not None:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {bs} = {num_blocks * bs} tokens, less than "
                f"max_model_len={max_len}; raise num_kv_blocks or lower max_model_len"
            )
        max_len = num_blocks * bs
    return max_len, num_blocks
