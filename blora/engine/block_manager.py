"""Paged KV cache bookkeeping in pure Python: which fixed-size blocks each sequence owns, and which full
blocks can be shared between sequences (prefix caching).

Prefix caching (like vLLM's automatic prefix caching, keyed by adapter too): once every token of a block is
computed, the block is registered under a hash of (adapter identity, all tokens up to the block's end),
chained block by block. A new sequence whose leading full blocks hash the same reuses them instead of
computing them again. The adapter changes K and V, so its identity (name and weight version; a mixture's
components and weights) is part of the hash: base rows share only with base rows, and a replaced adapter's
blocks are never hit again. Blocks are reference-counted; a freed block keeps its K/V and its hash and
waits in an LRU list, evicted only when a new block is needed and no never-cached block is free. At least
the last token of a sequence is always computed (its logits are needed), so a hit never covers it.
Blocks that a running sequence is computing in the current step are known too (``computing_next``): the
scheduler admits a sequence that would compute the same block a step later, to share it instead (the
``n`` sequences of one request, requests with the same system prompt arriving together).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from blora.engine.sequence import Sequence


@dataclass
class PrefixCacheStats:
    """Counters since the manager was created, in tokens (vLLM's ``prefix_cache_queries``/``_hits``)."""

    queries: int = 0  # tokens of admitted sequences looked up
    hits: int = 0  # of those, tokens found in cached blocks (not computed again)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Chained key of one full block: SHA-256 of the previous block's key and this block's token ids (a
    cryptographic hash, so one user's prompt cannot be crafted to collide with another's cached blocks)."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def root_hash(identity: str) -> bytes:
    """The chain's start for one adapter identity ("" for the base model)."""
    return hashlib.sha256(b"blora-prefix\0" + identity.encode()).digest()


class BlockManager:
    """Hands out KV cache blocks of ``block_size`` token slots; a sequence's ``block_table`` lists its blocks
    in order, so token ``i`` lives in slot ``block_table[i // block_size] * block_size + i % block_size``.
    With ``enable_caching``, full computed blocks are shared by hash (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-cached; pop() gives low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; least recently used first
        self._refs: list[int] = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # cached block -> its key
        self._cached: dict[bytes, int] = {}  # key -> cached block
        self._computing: dict[bytes, int] = {}  # key of a block being computed -> seq_id computing it
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get now: never-cached free blocks plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by sequences, 0..1 (cached blocks nobody uses count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    # -- lookups -----------------------------------------------------------------------------------
    def computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks holding ``seq``'s leading tokens, never its last token (which must be computed to
        give logits). Empty when caching is off, ``seq`` already has blocks or needs its prompt logprobs."""
        if not self._shared(seq) or seq.block_table or seq.needs_full_prompt:
            return []
        limit = (len(seq.token_ids) - 1) // self.block_size
        hashes = self._hashes(seq, limit)
        blocks: list[int] = []
        for i in range(limit):
            block = self._cached.get(hashes[i])
            if block is None:
                break
            blocks.append(block)
        return blocks

    def computing_next(self, seq: Sequence, computed: list[int]) -> bool:
        """Whether another sequence is computing, this step, the block that follows ``seq``'s cached ones
        (then ``seq`` shares it if admitted after this step)."""
        if not self._shared(seq) or not self._computing or seq.needs_full_prompt:
            return False
        limit = (len(seq.token_ids) - 1) // self.block_size
        i = len(computed)
        return i < limit and self._computing.get(self._hashes(seq, limit)[i], seq.seq_id) != seq.seq_id

    def _shared(self, seq: Sequence) -> bool:
        """Whether ``seq`` takes part in prefix caching (the scheduler gives every sequence its adapter's
        ``cache_identity`` when it is first admitted; one without is never shared)."""
        return self.enable_caching and seq.cache_identity is not None

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """``seq.block_hashes``, extended to hold at least the keys of its first ``num_blocks`` full blocks."""
        bs, hashes, identity = self.block_size, seq.block_hashes, seq.cache_identity
        if identity is None:  # callers check _shared(seq) first
            raise RuntimeError(f"sequence {seq.seq_id} has no cache identity: it was never admitted")
        parent = hashes[-1] if hashes else root_hash(identity)
        for i in range(len(hashes), num_blocks):
            parent = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            hashes.append(parent)
        return hashes

    # -- allocation --------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_tokens: int, computed: list[int] | None = None) -> int:
        """Free blocks ``seq`` needs so that its first ``num_tokens`` tokens have slots, when it first takes
        the cached ``computed`` blocks (those nobody uses come out of the free pool too)."""
        computed = computed or []
        have = len(seq.block_table) + len(computed)
        idle = sum(1 for b in computed if self._refs[b] == 0)
        return max(0, -(-num_tokens // self.block_size) - have) + idle

    def can_allocate(self, seq: Sequence, num_tokens: int, computed: list[int] | None = None) -> bool:
        return self.blocks_needed(seq, num_tokens, computed) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int, computed: list[int] | None = None) -> None:
        """Grow ``seq.block_table`` to cover ``num_tokens`` tokens (call ``can_allocate`` first). ``computed``
        (from ``computed_blocks``, only for a sequence without blocks) are taken first (the scheduler then
        starts the sequence's ``num_computed_tokens`` after them); ``num_tokens`` counts from its start."""
        needed = self.blocks_needed(seq, num_tokens, computed)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, {self.num_free_blocks} free")
        if computed:
            if seq.block_table:
                raise RuntimeError("cached blocks can only start a sequence that has no blocks")
            for block in computed:
                if self._refs[block] == 0:
                    del self._evictable[block]
                self._refs[block] += 1
            seq.block_table = list(computed)
            seq.num_cached_blocks = len(computed)
        for _ in range(-(-num_tokens // self.block_size) - len(seq.block_table)):
            block = self._take()
            self._refs[block] = 1
            seq.block_table.append(block)
        if self._shared(seq):  # the full blocks this allocation covers are computed in this step
            full = min(num_tokens, len(seq.token_ids)) // self.block_size
            hashes = self._hashes(seq, full)
            for i in range(seq.num_cached_blocks, full):
                key = hashes[i]
                if key not in self._cached:
                    self._computing.setdefault(key, seq.seq_id)

    def _take(self) -> int:
        """A free block: a never-cached one, else the least recently used cached one (forgotten)."""
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._hash_of.pop(block)]
        return block

    def record_query(self, seq: Sequence, computed: list[int]) -> None:
        """Count an admitted sequence's lookup: all its tokens queried, the cached ones hit."""
        if self.enable_caching:
            self.stats.queries += len(seq.token_ids)
            self.stats.hits += len(computed) * self.block_size

    def cache_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s full, computed blocks so later sequences can share them (after a step)."""
        if not self._shared(seq):
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        hashes = self._hashes(seq, full)
        for i in range(seq.num_cached_blocks, full):
            block, key = seq.block_table[i], hashes[i]
            if self._computing.get(key) == seq.seq_id:
                del self._computing[key]
            if block not in self._hash_of and key not in self._cached:  # else: the same K/V is cached
                self._cached[key] = block
                self._hash_of[block] = key
        seq.num_cached_blocks = max(seq.num_cached_blocks, full)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's ``reset_prefix_cache``): later sequences compute their prompts
        from scratch, as on a cold start (benchmarks that repeat the same prompts call it between timed
        runs). Only while no sequence holds blocks; returns False, changing nothing, otherwise. The hit
        counters are kept (they count since the manager was created)."""
        if any(self._refs):
            return False
        self._free.extend(reversed(self._evictable))  # those blocks' K/V is never read again
        self._evictable.clear()
        self._hash_of.clear()
        self._cached.clear()
        self._computing.clear()
        return True

    def free(self, seq: Sequence) -> None:
        """Release all of ``seq``'s blocks (cached ones stay shareable until evicted); the sequence forgets
        them (the scheduler resets its ``num_computed_tokens``)."""
        for key in seq.block_hashes[seq.num_cached_blocks :]:  # blocks it will not compute after all
            if self._computing.get(key) == seq.seq_id:
                del self._computing[key]
        for block in reversed(seq.block_table):  # the chain's tail is evicted before its head
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.num_cached_blocks = 0
