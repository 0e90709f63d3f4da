"""KV blocks: who holds which block of the pool, and which blocks hold a known prefix.

The pool is cut into blocks of `block_size` token slots. A sequence holds a block table
(its blocks, in position order) and takes a new block only when its next token starts
one. A full block is identified by a hash chained over its inputs and every input before
it (`block_hash`), so two sequences whose first n blocks have identical inputs also have
identical keys and values there: the second takes the first's blocks (reference counted)
instead of computing them again. Blocks that no sequence holds but whose hash is known
stay cached, and are evicted least recently used when the pool needs room; blocks that
hold nothing reusable are handed out first.
"""

from __future__ import annotations

import array
import collections
import hashlib
import heapq
from collections.abc import Sequence

HASH_BYTES = 16


def block_hash(parent: bytes, ids: Sequence[int], visual: bytes = b"") -> bytes:
    """The hash of one full block: `parent` (the previous block's hash, b"" for the first),
    the token id at each position, and for positions that hold visual embeddings
    instead of a token, their content (`visual`; see `prefix.py`)."""
    digest = hashlib.blake2b(parent, digest_size=HASH_BYTES)
    digest.update(array.array("q", ids).tobytes())
    digest.update(len(visual).to_bytes(8, "little"))
    digest.update(visual)
    return digest.digest()


class BlockManager:
    """Reference counts, the prefix hash table and the free and cached-free lists of
    `num_blocks` blocks. Only the scheduler thread calls it."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self.refs = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.table: dict[bytes, int] = {}
        self.free = list(range(num_blocks))
        """Blocks no sequence holds and no hash names (a heap): handed out first, lowest
        first, so a sequence's blocks tend to be consecutive (read in place)."""
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        """Blocks no sequence holds whose hash is known, least recently used first."""

    @property
    def available(self) -> int:
        """Blocks a sequence can take now (free, or cached and evicted on demand)."""
        return len(self.free) + len(self.evictable)

    @property
    def held(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.available

    @property
    def cached(self) -> int:
        """Blocks holding a known prefix, held or not."""
        return len(self.table)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks holding the longest run of `hashes` from the first."""
        found = []
        for h in hashes:
            block = self.table.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def room_for(self, hits: Sequence[int]) -> int:
        """Blocks left for new ones once a sequence took the cached blocks `hits`."""
        return self.available - sum(1 for b in hits if b in self.evictable)

    def take(self, hits: Sequence[int], new: int) -> list[int]:
        """A block table: the cached blocks `hits`, then `new` fresh ones."""
        if new > self.room_for(hits):
            raise RuntimeError(f"KV pool has {self.room_for(hits)} free blocks, {new} asked")
        for block in hits:
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
        return [*hits, *(self._fresh() for _ in range(new))]

    def _fresh(self) -> int:
        if self.free:
            block = heapq.heappop(self.free)
        else:
            block, _ = self.evictable.popitem(last=False)
            h = self.hashes[block]
            assert h is not None  # evictable blocks are the cached ones
            del self.table[h]
            self.hashes[block] = None
        self.refs[block] = 1
        return block

    def release(self, table: Sequence[int]) -> None:
        """Drop a sequence's hold on its blocks; the last ones are evicted first."""
        for block in reversed(table):
            self.refs[block] -= 1
            if self.refs[block] > 0:
                continue
            if self.hashes[block] is None:
                heapq.heappush(self.free, block)
            else:
                self.evictable[block] = None

    def register(self, block: int, h: bytes) -> None:
        """`block` now holds the keys and values of the prefix `h` names (they are
        written). A prefix already cached in another block keeps that block."""
        if self.prefix_cache and h not in self.table and self.hashes[block] is None:
            self.table[h] = block
            self.hashes[block] = h
