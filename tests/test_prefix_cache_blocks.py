"""Prefix caching in the block manager, pure Python: full computed blocks are shared by (adapter identity,
leading tokens); never the last token; reference counts; LRU over free cached blocks; counters."""

from __future__ import annotations

import pytest

from blora.engine.block_manager import BlockManager
from blora.engine.sampling_params import SamplingParams
from blora.engine.sequence import Request, Sequence

BS = 4


def make_seq(tokens: list[int], identity: str = "", seq_id: int = 0) -> Sequence:
    req = Request(str(seq_id), None, list(tokens), SamplingParams(), None, seq_id, 8)
    return Sequence(seq_id, req, 0, list(tokens), detokenizer=None, cache_identity=identity)


def run(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admit ``seq`` with whatever is cached, compute all of its tokens, register its blocks; returns the
    cached blocks it started from."""
    computed = bm.computed_blocks(seq)
    assert bm.can_allocate(seq, len(seq.token_ids), computed)
    bm.allocate(seq, len(seq.token_ids), computed)
    bm.record_query(seq, computed)
    seq.num_computed_tokens = len(seq.token_ids)
    bm.cache_blocks(seq)
    return computed


def test_same_tokens_and_adapter_share_full_blocks():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(list(range(10)), "adapter:x@1", 0)  # blocks: [0..3] [4..7] [8, 9]
    assert run(bm, a) == []
    b = make_seq(list(range(10)) + [99], "adapter:x@1", 1)
    assert run(bm, b) == a.block_table[:2]  # the two full blocks; the partial third one is not shared
    assert b.num_computed_tokens == 11 and b.block_table[2] != a.block_table[2]
    assert bm.usage == 4 / 16  # 3 blocks of a + 1 new one of b; the shared ones count once


@pytest.mark.parametrize(
    "identity, tokens",
    [
        ("adapter:y@1", list(range(10))),  # another adapter
        ("adapter:x@2", list(range(10))),  # the same adapter after a replace (new weight version)
        ("", list(range(10))),  # base rows
        ("adapter:x@1", [0, 1, 2, 3, 4, 5, 6, 0, 8, 9]),  # differs inside the second block
    ],
)
def test_other_adapters_versions_or_tokens_do_not_share(identity, tokens):
    bm = BlockManager(num_blocks=16, block_size=BS)
    run(bm, make_seq(list(range(10)), "adapter:x@1", 0))
    hits = bm.computed_blocks(make_seq(tokens, identity, 1))
    assert len(hits) == (1 if tokens[:4] == [0, 1, 2, 3] and identity == "adapter:x@1" else 0)


def test_the_last_token_is_always_computed():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(list(range(8)), "", 0)  # exactly two full blocks
    run(bm, a)
    assert bm.num_cached_blocks == 2
    b = make_seq(list(range(8)), "", 1)
    assert run(bm, b) == a.block_table[:1]  # only the first: the second holds the last token
    assert b.num_computed_tokens == 8 and len(b.block_table) == 2
    one = make_seq([0, 1, 2, 3], "", 2)
    assert bm.computed_blocks(one) == []


def test_reference_counts_and_lru_eviction():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq(list(range(9)), "", 0)  # 3 blocks, 2 cached
    run(bm, a)
    b = make_seq(list(range(9)), "", 1)
    run(bm, b)  # shares 2, owns 1
    shared = a.block_table[:2]
    assert bm.num_free_blocks == 6 - 4
    bm.free(a)  # the shared blocks stay in use by b; a's own partial block is free again
    assert bm.num_free_blocks == 3 and bm.num_cached_blocks == 2
    bm.free(b)  # now the cached blocks wait in the LRU list: free, but still hit
    assert bm.num_free_blocks == 6 and bm.usage == 0.0 and bm.num_cached_blocks == 2
    c = make_seq(list(range(9)), "", 2)
    assert bm.computed_blocks(c) == shared
    # never-cached blocks are handed out before cached ones are evicted
    other = make_seq(list(range(100, 116)), "", 3)
    bm.allocate(other, 16)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 2
    # then the least recently used cached block goes first: the chain's tail (freed first in reverse order)
    tail = make_seq([7], "", 4)
    bm.allocate(tail, 1)
    assert bm.num_cached_blocks == 1
    assert len(bm.computed_blocks(make_seq(list(range(9)), "", 5))) == 1  # the head is still there


def test_hit_blocks_nobody_uses_count_against_free_blocks():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(13)), "", 0)  # 4 blocks, 3 cached
    run(bm, a)
    bm.free(a)
    b = make_seq(list(range(13)), "", 1)
    computed = bm.computed_blocks(b)
    assert len(computed) == 3
    assert bm.blocks_needed(b, 13, computed) == 4  # 3 idle cached blocks + 1 new
    bm.allocate(b, 13, computed)
    assert bm.num_free_blocks == 0 and b.block_table[:3] == computed and b.num_cached_blocks == 3
    c = make_seq(list(range(13)), "", 2)
    computed = bm.computed_blocks(c)
    assert bm.blocks_needed(c, 13, computed) == 1  # the cached blocks are in use: sharing them is free
    assert not bm.can_allocate(c, 13, computed)


def test_counters_and_off_switch():
    bm = BlockManager(num_blocks=16, block_size=BS)
    run(bm, make_seq(list(range(10)), "", 0))
    run(bm, make_seq(list(range(10)), "", 1))
    assert (bm.stats.queries, bm.stats.hits) == (20, 8)
    assert bm.stats.hit_rate == pytest.approx(0.4)
    off = BlockManager(num_blocks=16, block_size=BS, enable_caching=False)
    a = make_seq(list(range(10)), "", 0)
    run(off, a)
    off.free(a)
    assert off.num_cached_blocks == 0 and run(off, make_seq(list(range(10)), "", 1)) == []
    assert (off.stats.queries, off.stats.hits) == (0, 0)


def test_duplicate_blocks_computed_at_once_are_cached_once():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a, b = make_seq(list(range(9)), "", 0), make_seq(list(range(9)), "", 1)
    for seq in (a, b):  # both admitted before either computed anything (same step)
        bm.allocate(seq, 9, bm.computed_blocks(seq))
    for seq in (a, b):
        seq.num_computed_tokens = 9
        bm.cache_blocks(seq)
    assert bm.num_cached_blocks == 2
    bm.free(a)
    bm.free(b)  # b's duplicates were never cached: they are plain free blocks again
    assert bm.num_free_blocks == 16 and bm.num_cached_blocks == 2


def test_a_block_being_computed_is_waited_for_not_computed_twice():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a, b = make_seq(list(range(9)), "", 0), make_seq(list(range(9)) + [5], "", 1)
    bm.allocate(a, 6)  # a chunk: block 0 full this step, block 1 not yet
    assert bm.computing_next(b, bm.computed_blocks(b))  # b would compute block 0 again: wait a step
    assert not bm.computing_next(make_seq(list(range(9)), "adapter:x@1", 2), [])  # another adapter
    a.num_computed_tokens = 6
    bm.cache_blocks(a)
    computed = bm.computed_blocks(b)
    assert len(computed) == 1 and not bm.computing_next(b, computed)  # block 1 is not being computed
    bm.allocate(a, 9)
    assert bm.computing_next(b, computed)
    bm.free(a)  # preempted before computing it: nobody computes it any more
    assert not bm.computing_next(b, computed) and len(bm.computed_blocks(b)) == 1


def test_reset_forgets_cached_blocks_only_when_none_is_held():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(10)), "", 0)
    run(bm, a)
    held = make_seq(list(range(10)), "", 1)
    assert run(bm, held) == a.block_table[:2]
    bm.free(a)
    assert not bm.reset_prefix_cache()  # `held` still holds blocks: nothing changes
    assert bm.computed_blocks(make_seq(list(range(10)), "", 2)) == held.block_table[:2]
    bm.free(held)
    assert bm.num_cached_blocks == 2 and bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8 and bm.usage == 0.0
    again = make_seq(list(range(10)), "", 3)
    assert run(bm, again) == []  # computed from scratch, then cached again
    assert bm.num_cached_blocks == 2 and len(set(bm._free) | set(again.block_table)) == 8
    assert bm.stats.hits == 2 * BS  # the counters are kept
