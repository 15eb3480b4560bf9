"""Paged KV cache bookkeeping in pure Python: which fixed-size blocks each sequence owns."""

from __future__ import annotations

from blora.engine.sequence import Sequence


class BlockManager:
    """Hands out KV cache blocks of ``block_size`` token slots; a sequence's ``block_table`` lists its blocks
    in order, so token ``i`` lives in slot ``block_table[i // block_size] * block_size + i % block_size``."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks ``seq`` needs so that its first ``num_tokens`` tokens have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq.block_table`` to cover ``num_tokens`` tokens (call ``can_allocate`` first)."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {needed}, {len(self._free)} free")
        seq.block_table.extend(self._free.pop() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        """Return all of ``seq``'s blocks; its cached tokens are forgotten."""
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed_tokens = 0
