"""The pool of KV blocks: ref counts, an O(1) LRU free list, and the prefix-cache map (pure Python)."""
from __future__ import annotations

from collections import OrderedDict

BlockKey = tuple  # (parent block hash | None, token ids of the block, salt)


class BlockPool:
    """Blocks are ints in [0, num_blocks). A block is either free (ref 0, in the free list) or
    used (ref > 0). A free block may still hold a cached prefix (it keeps its key) until the LRU
    order hands it out again: eviction is lazy."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[BlockKey | None] = [None] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockKey, int] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self, num: int) -> list[int]:
        """Take ``num`` blocks from the LRU end of the free list (caller checked num_free)."""
        assert num <= len(self.free_blocks), (num, len(self.free_blocks))
        out = []
        for _ in range(num):
            block_id, _ = self.free_blocks.popitem(last=False)
            key = self.block_keys[block_id]
            if key is not None:  # lazily evict the cached prefix this block still held
                if self.cached.get(key) == block_id:
                    del self.cached[key]
                self.block_keys[block_id] = None
                self.num_evictions += 1
            self.ref_counts[block_id] = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: list[int]) -> None:
        """Take one more reference (prefix-cache hit or fork); revives free cached blocks."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_blocks[block_id]
            self.ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference each; blocks reaching 0 join the free list in the given order
        (callers pass a sequence's blocks tail first so that its tail is evicted first)."""
        for block_id in block_ids:
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, block_id
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None

    def lookup(self, key: BlockKey) -> int | None:
        return self.cached.get(key)

    def cache_block(self, block_id: int, key: BlockKey) -> None:
        """Register a full block under its key; an identical block already cached wins."""
        if not self.enable_caching or self.block_keys[block_id] is not None:
            return
        if key in self.cached:
            return
        self.cached[key] = block_id
        self.block_keys[block_id] = key

    def num_free_excluding(self, block_ids: list[int]) -> int:
        """Free blocks left once ``block_ids`` (hits about to be touched) leave the free list."""
        return len(self.free_blocks) - sum(1 for b in block_ids if self.ref_counts[b] == 0)

    def check_integrity(self, expected_refs: dict[int, int] | None = None) -> None:
        used = [b for b in range(self.num_blocks) if self.ref_counts[b] > 0]
        assert len(used) + len(self.free_blocks) == self.num_blocks, (
            f"free {len(self.free_blocks)} + used {len(used)} != total {self.num_blocks}")
        for b in self.free_blocks:
            assert self.ref_counts[b] == 0, f"block {b} is free with ref {self.ref_counts[b]}"
        for key, b in self.cached.items():
            assert self.block_keys[b] == key, f"cached block {b} lost its key"
        if expected_refs is not None:
            for b in range(self.num_blocks):
                assert self.ref_counts[b] == expected_refs.get(b, 0), (
                    f"block {b}: ref {self.ref_counts[b]} but {expected_refs.get(b, 0)} holders")
