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
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "blora_paged"


@dataclass
class PrefillChunk:
    """Rows ``[row, row + num_tokens)`` of the flat batch are positions ``[start, start + num_tokens)`` of one
    sequence; ``block_table`` [num_blocks] holds the blocks of its first ``start + num_tokens`` tokens."""

    row: int
    num_tokens: int
    start: int
    block_table: torch.Tensor

    @property
    def context_len(self) -> int:
        return self.start + self.num_tokens


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step, built once by the model runner and shared by all layers.

    ``slot_mapping`` [N]: cache slot (``block * block_size + offset``) of each new token.
    Single-token chunks (decodes) are batched: ``decode_rows`` [Bd] their rows in the flat batch,
    ``decode_block_tables`` [Bd, max_blocks] (padded with block 0), ``decode_context_lens`` [Bd].
    Longer chunks (prefills) are listed in ``prefills``.
    """

    num_tokens: int
    slot_mapping: torch.Tensor
    decode_rows: torch.Tensor | None = None
    decode_block_tables: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    all_decode: bool = False
    prefills: list[PrefillChunk] = field(default_factory=list)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_mask(self, block_size: int, sliding_window: int | None) -> torch.Tensor:
        """[Bd, 1, 1, L] True where a decode query may attend (cached, causal, inside the window)."""
        mask = self._masks.get(sliding_window)
        if mask is None:
            lens = self.decode_context_lens
            key_pos = torch.arange(self.decode_block_tables.shape[1] * block_size, device=lens.device)
            mask = key_pos[None, :] < lens[:, None]
            if sliding_window is not None:
                mask &= key_pos[None, :] > (lens[:, None] - 1 - sliding_window)
            mask = mask[:, None, None, :]
            self._masks[sliding_window] = mask
        return mask


class KVCache:
    """Per layer, keys and values as ``[num_blocks, block_size, KVH, D]`` tensors, allocated on first use
    (so head counts and dims come from the model's actual tensors, whatever the architecture)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) cache of a layer; ``like`` [1, KVH, N, D] gives shape, dtype and device."""
        kv = self.layers.get(layer_idx)
        if kv is None:
            shape = (self.num_blocks, self.block_size, like.shape[1], like.shape[3])
            kv = (like.new_zeros(shape), like.new_zeros(shape))
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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Store the step's K/V in the paged cache and attend; returns ``([1, N, H, D], None)``.

    Semantics: for each sequence, ``softmax(q K^T * scaling + causal/window mask) V`` over all its cached
    tokens, with K/V heads shared by ``H // KVH`` query heads (GQA).
    """
    ctx = _FORWARD.get()
    if ctx is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"{type(module).__name__} uses attention logit soft-capping or sinks, which blora's paged "
            "attention does not implement yet"
        )
    cache, meta = ctx
    k_cache, v_cache = cache.layer(module.layer_idx, key)
    _store(k_cache, v_cache, key, value, meta.slot_mapping)
    out = query.new_empty(meta.num_tokens, query.shape[1], query.shape[3])
    if meta.decode_rows is not None:
        dec = _decode(query, k_cache, v_cache, meta, scaling, sliding_window)
        if meta.all_decode:
            out = dec
        else:
            out.index_copy_(0, meta.decode_rows, dec)
    for chunk in meta.prefills:
        rows = slice(chunk.row, chunk.row + chunk.num_tokens)
        out[rows] = _prefill(query, key, value, k_cache, v_cache, chunk, scaling, sliding_window)
    return out.unsqueeze(0), None


def _store(
    k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Semantics: ``k_cache.view(-1, KVH, D)[slots] = key[0].transpose(0, 1)`` (same for values)."""
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kvh, d).index_copy_(0, slots, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slots, value[0].transpose(0, 1).to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, nb] block ids -> [B, KVH, nb * block_size, D] keys or values."""
    b, nb = block_tables.shape
    blocks = cache[block_tables]  # [B, nb, bs, KVH, D]
    return blocks.view(b, nb * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def _decode(query, k_cache, v_cache, meta: AttentionMetadata, scaling, sliding_window) -> torch.Tensor:
    """All single-token queries at once: one SDPA over each sequence's gathered blocks -> [Bd, H, D].

    GQA without copies: the ``n_rep`` query heads of a K/V head play the role of ``n_rep`` query rows.
    """
    h, kvh, d = query.shape[1], k_cache.shape[2], query.shape[3]
    q = query[0].index_select(1, meta.decode_rows) if not meta.all_decode else query[0]
    bd = q.shape[1]
    q = q.transpose(0, 1).reshape(bd, kvh, h // kvh, d)  # head j uses K/V head j // n_rep
    k = _gather(k_cache, meta.decode_block_tables)
    v = _gather(v_cache, meta.decode_block_tables)
    mask = meta.decode_mask(k_cache.shape[1], sliding_window)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.reshape(bd, h, d)


def _prefill(query, key, value, k_cache, v_cache, chunk: PrefillChunk, scaling, sliding_window):
    """One sequence's chunk of queries over its cached prefix and itself (causal) -> [n, H, D]."""
    rows = slice(chunk.row, chunk.row + chunk.num_tokens)
    q = query[:, :, rows]
    gqa = query.shape[1] != key.shape[1]
    windowed = sliding_window is not None and chunk.context_len > sliding_window
    if chunk.start == 0 and not windowed:  # nothing cached before: attend to the chunk itself
        k, v = key[:, :, rows], value[:, :, rows]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        return out[0].transpose(0, 1)
    n_ctx = chunk.context_len
    k = _gather(k_cache, chunk.block_table[None])[:, :, :n_ctx]
    v = _gather(v_cache, chunk.block_table[None])[:, :, :n_ctx]
    q_pos = torch.arange(chunk.start, n_ctx, device=q.device)[:, None]
    k_pos = torch.arange(n_ctx, device=q.device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def _mask(*args, **kwargs):
    """No dense mask inside the engine (attention builds its own per sequence); sdpa's mask outside it."""
    if _FORWARD.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register the backend with transformers (idempotent); returns its name for ``_attn_implementation``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)
    return ATTN_IMPLEMENTATION
