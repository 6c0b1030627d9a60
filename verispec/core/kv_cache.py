"""The verifier's KV cache in fixed-size blocks, shared by every running request, with prefix reuse.

Memory is a pool of `num_blocks` blocks of `block_size` positions each (the tensors live in the
runner; this module only does the bookkeeping). A request holds a block table: its position p
lives in block `table[p // block_size]` at offset `p % block_size`. A request's blocks are taken
from the pool as it grows and all returned when it finishes, is cancelled or is preempted.

Prefix reuse, as vLLM's automatic prefix caching does it: once a block holds only verified
positions it is registered under a hash of its tokens chained with the hash of the block before
it, so the hash names the whole prefix up to the block's end. A later request whose prompt starts
with the same tokens takes those blocks instead of recomputing them. The kernel step computes a
position's keys and values from the tokens up to it alone, bitwise, whatever else shared its pass
and however its prompt was chunked, so a reused block holds exactly the bits the request would
have computed itself. Blocks nobody holds stay cached until the pool needs them; the least
recently used are reused first, and blocks that hold nothing reusable before any of them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class OutOfBlocks(Exception):
    """The pool has no free block: the scheduler preempts a request and tries again."""


@dataclass
class _Block:
    refs: int = 0  # requests holding it
    key: bytes | None = None  # prefix hash while registered in the prefix cache


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._blocks = [_Block() for _ in range(num_blocks)]
        # Blocks nobody holds, in the order they are reused: empty ones first, then cached ones
        # from least to most recently used.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.queries = 0  # prompt tokens looked up in the prefix cache (vLLM counts tokens)
        self.hits = 0  # of those, found

    # -- figures -----------------------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks held by requests (cached blocks nobody holds count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    # -- taking and returning blocks --------------------------------------------------------

    def take(self) -> int:
        if not self._free:
            raise OutOfBlocks()
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.key is not None:  # evicted: its prefix is no longer cached
            del self._cached[block.key]
            block.key = None
        block.refs = 1
        return block_id

    def release(self, table: Sequence[int]) -> None:
        """Return a request's blocks; the last ones first, so that a prefix outlives its tails."""
        for block_id in reversed(table):
            block = self._blocks[block_id]
            block.refs -= 1
            assert block.refs >= 0, f"block {block_id} released twice"
            if block.refs == 0:
                self._free[block_id] = None
                if block.key is None:
                    self._free.move_to_end(block_id, last=False)  # nothing to keep: reuse it first

    # -- prefix cache ------------------------------------------------------------------------

    def keys(self, tokens: Sequence[int], count: int, parent: bytes = b"") -> list[bytes]:
        """Chained hashes of the first `count` full blocks of `tokens`."""
        bs, out = self.block_size, []
        array = np.asarray(tokens[: count * bs], dtype=np.int64)
        for i in range(count):
            parent = hashlib.blake2b(parent + array[i * bs : (i + 1) * bs].tobytes(), digest_size=16).digest()
            out.append(parent)
        return out

    def match(self, tokens: Sequence[int], limit: int) -> tuple[list[int], list[bytes]]:
        """Cached blocks holding the longest prefix of `tokens` of at most `limit` positions, now
        held by the caller, and their keys."""
        count = limit // self.block_size
        if not self.prefix_cache or count == 0:
            return [], []
        self.queries += count * self.block_size
        table, keys = [], []
        for key in self.keys(tokens, count):
            block_id = self._cached.get(key)
            if block_id is None:
                break
            block = self._blocks[block_id]
            if block.refs == 0:
                del self._free[block_id]
            block.refs += 1
            table.append(block_id)
            keys.append(key)
        self.hits += len(table) * self.block_size
        return table, keys

    def holds(self, key: bytes) -> bool:
        """Whether a block with this prefix hash is cached."""
        return key in self._cached

    def register(self, block_id: int, key: bytes) -> None:
        """Offer a block of verified positions for reuse under its prefix hash."""
        if not self.prefix_cache or key in self._cached:
            return  # another request cached the same prefix first; this block stays private
        block = self._blocks[block_id]
        block.key = key
        self._cached[key] = block_id


class BlockTable:
    """One request's blocks and how far they are filled with verified positions."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.keys: list[bytes] = []  # prefix hashes of the registered leading blocks
        self.computed = 0  # positions whose keys and values are in the cache, all verified
        self.capacity: int | None = None  # the most positions its request will hold, where known
        self.state: object = None  # the runner's own per-sequence state, if it keeps one (session_runner.py)

    def reuse_prefix(self, tokens: Sequence[int]) -> int:
        """Start from the cached blocks of `tokens`' prefix; returns the positions reused. The
        last token is always left to compute (it opens the first round)."""
        assert not self.blocks
        self.blocks, self.keys = self.pool.match(tokens, len(tokens) - 1)
        self.computed = len(self.blocks) * self.pool.block_size
        return self.computed

    def reserve(self, positions: int) -> None:
        """Hold blocks for positions 0..positions-1 (raises OutOfBlocks, keeping what it took)."""
        while len(self.blocks) * self.pool.block_size < positions:
            self.blocks.append(self.pool.take())

    def verified(self, computed: int, tokens: Sequence[int]) -> None:
        """Positions below `computed` now hold verified keys and values: register full blocks."""
        self.computed = computed
        full = computed // self.pool.block_size
        if self.pool.prefix_cache and full > len(self.keys):
            parent = self.keys[-1] if self.keys else b""
            start = len(self.keys) * self.pool.block_size
            new = self.pool.keys(tokens[start:], full - len(self.keys), parent)
            for block_id, key in zip(self.blocks[len(self.keys) : full], new, strict=True):
                self.pool.register(block_id, key)
            self.keys += new

    def free(self) -> None:
        self.pool.release(self.blocks)
        self.blocks, self.keys, self.computed, self.state = [], [], 0, None

    def slots(self, start: int, count: int) -> list[int]:
        bs = self.pool.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, start + count)]
