"""Paged KV cache and the attention backend that transformers' own attention modules call.

We register ``blora_paged`` in transformers' ``AttentionInterface``. Every HF attention module (Llama,
Mistral, Qwen2, GPT-2, Gemma, Phi-3, ...) computes q/k/v and rotary embeddings itself, then calls it with
``query [1, H, N, D]``, ``key``/``value [1, KVH, N, D]`` for the whole flat batch. The function writes the new
keys/values into the paged cache and attends each sequence over its own cached tokens, reading the step's
``AttentionMetadata`` from a scoped forward context (a ``ContextVar`` set by the model runner). Outside
that context it behaves exactly like ``sdpa``, so the same model still works with ``model.generate``.

A matching mask function is registered too: inside the context it returns None, so transformers builds
no dense [N, N] causal mask for the flat batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from blora import kernels

ATTN_IMPLEMENTATION = "blora_paged"
# ``EngineConfig.attention_backend``: "cpu" (the C++ kernels where they apply, else PyTorch ops), "torch"
# (PyTorch ops on any device), "triton" (the Triton decode kernel over the paged cache), "auto" (resolved once)
ATTENTION_BACKENDS = ("auto", "cpu", "torch", "triton")


@dataclass
class PrefillChunk:
    """Rows ``[row, row + num_tokens)`` of the flat batch are positions ``[start, start + num_tokens)`` of one
    sequence; ``slots`` [start + num_tokens] are the cache slots of all its tokens so far."""

    row: int
    num_tokens: int
    start: int
    slots: torch.Tensor

    @property
    def context_len(self) -> int:
        return self.start + self.num_tokens


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step, built once by the model runner and shared by all layers.

    ``slot_mapping`` [N]: cache slot (``block * block_size + offset``) of each new token.
    Single-token chunks (decodes) are batched: ``decode_rows`` [Bd] their rows in the flat batch,
    ``decode_slots`` [Bd, L] the slots of each one's context, padded to a common length L with the
    cache's zeroed ``null_slot`` (so masked keys and values are finite: cache memory is never cleared),
    ``decode_context_lens`` [Bd]. Longer chunks (prefills) are listed in ``prefills``.
    """

    num_tokens: int
    slot_mapping: torch.Tensor
    decode_rows: torch.Tensor | None = None
    decode_slots: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    all_decode: bool = False
    prefills: list[PrefillChunk] = field(default_factory=list)
    backend: str = "cpu"  # the engine's resolved ``attention_backend`` ("cpu", "torch" or "triton")
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(decode_rows, decode_slots, decode_context_lens)``, for a step that has decode queries."""
        rows, slots, lens = self.decode_rows, self.decode_slots, self.decode_context_lens
        assert rows is not None and slots is not None and lens is not None, "this step has no decode queries"
        return rows, slots, lens

    def decode_bias(self, sliding_window: int | None) -> torch.Tensor:
        """[Bd, 1, L] float32 additive mask: 0 where a decode query may attend (cached, causal, inside the
        window), -inf elsewhere. Built once per step and window size, shared by all layers."""
        bias = self._masks.get(sliding_window)
        if bias is None:
            _, slots, lens = self.decode_batch()
            key_pos = torch.arange(slots.shape[1], device=lens.device)
            allowed = key_pos[None, :] < lens[:, None]
            if sliding_window is not None:
                allowed &= key_pos[None, :] > (lens[:, None] - 1 - sliding_window)
            bias = torch.zeros(allowed.shape, dtype=torch.float32, device=lens.device)
            bias = bias.masked_fill_(~allowed, float("-inf"))[:, None, :]
            self._masks[sliding_window] = bias
        return bias


class KVCache:
    """Per layer, keys and values as ``[KVH, num_blocks * block_size + 1, D]`` tensors (head-major, so a
    gather of token slots is directly a batch of contiguous [L, D] matrices per head), allocated on first
    use: head counts and dims come from the model's actual tensors, whatever the architecture.

    The memory is not cleared (``torch.empty``: on CPU, untouched pages cost no RAM); every slot is written
    before it is read, except the extra last slot, ``null_slot``, which stays zero and pads gathers."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.null_slot = num_blocks * block_size
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) cache of a layer; ``like`` [1, KVH, N, D] gives shape, dtype and device."""
        kv = self.layers.get(layer_idx)
        if kv is None:
            shape = (like.shape[1], self.null_slot + 1, like.shape[3])
            kv = (like.new_empty(shape), like.new_empty(shape))
            for t in kv:
                t[:, self.null_slot].zero_()
            self.layers[layer_idx] = kv
        return kv

    def bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers.values())


_FORWARD: contextvars.ContextVar[tuple[KVCache, AttentionMetadata] | None] = contextvars.ContextVar(
    "blora_forward", default=None
)


@contextlib.contextmanager
def forward_context(cache: KVCache, metadata: AttentionMetadata) -> Iterator[None]:
    """Make ``cache`` and ``metadata`` visible to ``paged_attention`` during one forward (this thread only)."""
    token = _FORWARD.set((cache, metadata))
    try:
        yield
    finally:
        _FORWARD.reset(token)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Store the step's K/V in the paged cache and attend; returns ``([1, N, H, D], None)``.

    Semantics: for each sequence, ``softmax(q K^T * scaling + causal/window mask) V`` over all its cached
    tokens, with K/V heads shared by ``H // KVH`` query heads (GQA). With ``softcap`` (Gemma 2's attention
    logit soft-capping) the scaled scores are first ``tanh(s / softcap) * softcap``; those steps run in
    PyTorch ops (the C++ / Triton decode kernels have no soft-capping).
    """
    ctx = _FORWARD.get()
    if ctx is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"{type(module).__name__} uses attention sinks, which blora's paged attention does not implement yet"
        )
    softcap = kwargs.get("softcap")
    cache, meta = ctx
    # transformers' attention modules carry their layer's index (nn.Module's __getattr__ is untyped)
    k_cache, v_cache = cache.layer(cast(int, module.layer_idx), key)
    kernel = _kernel_for(query, k_cache) if meta.backend == "cpu" else None
    _store(kernel, k_cache, v_cache, key, value, meta.slot_mapping)
    out = query.new_empty(meta.num_tokens, query.shape[1], query.shape[3])
    if meta.decode_rows is not None:
        if softcap is not None:
            dec = _decode_torch(query, k_cache, v_cache, meta, scaling, sliding_window, softcap)
        else:
            dec = _decode(kernel, query, k_cache, v_cache, meta, scaling, sliding_window)
        if meta.all_decode:
            out = dec
        else:
            out.index_copy_(0, meta.decode_rows, dec)
    for chunk in meta.prefills:
        rows = slice(chunk.row, chunk.row + chunk.num_tokens)
        out[rows] = _prefill(query, key, value, k_cache, v_cache, chunk, scaling, sliding_window, softcap)
    return out.unsqueeze(0), None


def _store(
    kernel: kernels.CpuKernel | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Semantics: ``k_cache[:, slots] = key[0]``, ``v_cache[:, slots] = value[0]``."""
    k, v = key[0], value[0]
    if (
        kernel is not None
        and k.dtype == v.dtype == k_cache.dtype
        and k.stride(-1) == 1
        and v.stride() == k.stride()
        and slots.is_contiguous()
    ):
        kernel.store_kv(k, v, k_cache, v_cache, slots)
        return
    k_cache.index_copy_(1, slots, key[0].to(k_cache.dtype))
    v_cache.index_copy_(1, slots, value[0].to(v_cache.dtype))


def _decode(
    kernel: kernels.CpuKernel | None,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """All single-token queries at once over each sequence's cached tokens -> [Bd, H, D].

    On CPU (float32 / bfloat16) the C++ kernel reads keys and values straight from the paged cache (no
    gather copy) with float32 accumulation; with the "triton" backend the Triton kernel does the same on
    the GPU; elsewhere, or without a compiler, ``_decode_torch``.
    """
    decode_rows, decode_slots, decode_lens = meta.decode_batch()
    if meta.backend == "triton":
        scale = query.shape[3] ** -0.5 if scaling is None else float(scaling)
        return _triton_decode()(
            query[0], decode_rows, k_cache, v_cache, decode_slots, decode_lens, scale, sliding_window
        )
    if kernel is None:
        return _decode_torch(query, k_cache, v_cache, meta, scaling, sliding_window)
    scale = query.shape[3] ** -0.5 if scaling is None else float(scaling)
    rows = None if meta.all_decode else decode_rows
    return kernel.decode_attention(
        query[0], rows, k_cache, v_cache, decode_slots, decode_lens, scale, sliding_window
    )


@functools.cache
def _triton_decode() -> Callable[..., torch.Tensor]:
    """``blora.kernels.triton.attention.paged_decode_attention``, imported on first use (triton is optional)."""
    from blora.kernels.triton.attention import paged_decode_attention

    return paged_decode_attention


def select_backend(name: str, device: torch.device, cpu_kernel: bool = True) -> str:
    """Resolve ``EngineConfig.attention_backend`` once for the model's ``device``; ``ValueError`` naming the
    field when the choice cannot run there. "auto": "triton" on CUDA when triton is installed, else "cpu"
    on CPU with ``cpu_kernel``, else "torch"."""
    from blora.kernels import triton as triton_kernels  # no triton import: only checks it is installed

    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and triton_kernels.available(device):
            return "triton"
        return "cpu" if device.type == "cpu" and cpu_kernel else "torch"
    if name == "cpu" and (device.type != "cpu" or not cpu_kernel):
        why = "the model is on " + device.type if device.type != "cpu" else "cpu_kernel=False"
        raise ValueError(
            f"attention_backend='cpu' runs the C++ kernels on CPU tensors, but {why}; use 'auto'"
        )
    if name == "triton" and not triton_kernels.available(device):
        raise ValueError(
            f"attention_backend='triton' needs a CUDA device and the triton package (or, for tests, "
            f"TRITON_INTERPRET=1 set before triton is imported); the model is on {device.type}. Use 'auto'"
        )
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    return name


def _kernel_for(query: torch.Tensor, k_cache: torch.Tensor) -> kernels.CpuKernel | None:
    """The CPU kernels for this attention call, or None. Only an AVX-512 build: the portable build's scalar
    ``exp`` made decode attention ~1.5x slower than the PyTorch path (measured with -DBLORA_GENERIC here)."""
    if (
        query.device.type != "cpu"
        or query.dtype not in kernels.DTYPES
        or k_cache.dtype != query.dtype
        or query.stride(-1) != 1
        or query.shape[1] % k_cache.shape[0]
    ):
        return None
    kernel = kernels.get()
    return kernel if kernel is not None and kernel.native_vector else None


def _decode_torch(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """PyTorch decode attention (any device): gather + two ``bmm`` -> [Bd, H, D].

    Semantics per sequence b and head j: ``softmax(q[b, j] @ K[j // n_rep, slots_b].T * scaling) @ V[...]``.
    K/V heads are the outer batch dimension ([KVH * Bd, L, D] after one ``index_select``), and the
    ``n_rep`` query heads sharing a K/V head are its query rows: GQA without repeating K/V, and two bmm
    calls without copies. Float32 softmax, as HF's eager attention; ~2x faster than SDPA's CPU kernel here.
    """
    h, d = query.shape[1], query.shape[3]
    kvh = k_cache.shape[0]
    decode_rows, decode_slots, _ = meta.decode_batch()
    q = query[0] if meta.all_decode else query[0].index_select(1, decode_rows)  # [H, Bd, D]
    bd, n_ctx = q.shape[1], decode_slots.shape[1]
    q = q.view(kvh, h // kvh, bd, d).transpose(1, 2).reshape(kvh * bd, h // kvh, d)
    flat = decode_slots.view(-1)
    k = k_cache.index_select(1, flat).view(kvh * bd, n_ctx, d)
    v = v_cache.index_select(1, flat).view(kvh * bd, n_ctx, d)
    scores = torch.bmm(q, k.transpose(1, 2)).float().view(kvh, bd, h // kvh, n_ctx)
    scores = scores.mul_(d**-0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    scores = scores.add_(meta.decode_bias(sliding_window))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(kvh * bd, h // kvh, n_ctx)
    out = torch.bmm(probs, v).view(kvh, bd, h // kvh, d)
    return out.permute(1, 0, 2, 3).reshape(bd, h, d)


def _prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One sequence's chunk of queries over its cached prefix and itself (causal) -> [n, H, D]."""
    rows = slice(chunk.row, chunk.row + chunk.num_tokens)
    q = query[:, :, rows]
    gqa = query.shape[1] != key.shape[1]
    windowed = sliding_window is not None and chunk.context_len > sliding_window
    if (
        chunk.start == 0 and not windowed and softcap is None
    ):  # nothing cached before: attend to the chunk itself
        k, v = key[:, :, rows], value[:, :, rows]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        return out[0].transpose(0, 1)
    n_ctx = chunk.context_len
    k = k_cache.index_select(1, chunk.slots)[None]
    v = v_cache.index_select(1, chunk.slots)[None]
    q_pos = torch.arange(chunk.start, n_ctx, device=q.device)[:, None]
    k_pos = torch.arange(n_ctx, device=q.device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    if softcap is not None:  # SDPA has no soft-capping: scores, cap, mask, float32 softmax (HF's eager order)
        if gqa:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * (q.shape[3] ** -0.5 if scaling is None else scaling)
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)[0].transpose(0, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def _mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No dense mask inside the engine (attention builds its own per sequence); sdpa's mask outside it."""
    if _FORWARD.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register the backend with transformers (idempotent); returns its name for ``_attn_implementation``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)
    return ATTN_IMPLEMENTATION
