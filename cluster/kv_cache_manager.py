"""Which KV blocks each sequence owns: allocation, prefix caching, forks, copy-on-write.

Pure Python; the tensors live in workers/. Block layout: DESIGN.md section 4.
"""
from __future__ import annotations

from raylm.cluster.block_pool import BlockKey, BlockPool
from raylm.cluster.request import Sequence


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.seqs: dict[int, Sequence] = {}  # seq_id -> sequences holding blocks
        self.block_keys: dict[int, list[BlockKey]] = {}  # seq_id -> keys of its full blocks
        self.num_published: dict[int, int] = {}  # seq_id -> leading blocks already in the cache
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # -- queries ----------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _key(self, seq: Sequence, index: int, parent: BlockKey | None) -> BlockKey:
        start = index * self.block_size
        tokens = tuple(seq.token_ids[start : start + self.block_size])
        salt = seq.request.cache_salt if parent is None else None
        return (hash(parent) if parent is not None else None, tokens, salt)

    def _keys_of(self, seq: Sequence, num_full_blocks: int) -> list[BlockKey]:
        keys = self.block_keys.setdefault(seq.seq_id, [])
        for i in range(len(keys), num_full_blocks):
            keys.append(self._key(seq, i, keys[-1] if keys else None))
        return keys

    # -- allocation -------------------------------------------------------------------------
    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], int]:
        """Longest cached prefix of a sequence that has no blocks yet, in full blocks.
        Never covers the last token: its logits must be computed."""
        assert not seq.block_ids and seq.num_computed_tokens == 0, seq
        if not self.enable_prefix_caching:
            return [], 0
        num_full = (seq.num_tokens - 1) // self.block_size
        hits = []
        for key in self._keys_of(seq, num_full):
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            hits.append(block_id)
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> list[tuple[int, int]] | None:
        """Make room for ``num_new_tokens`` after the computed ones (plus the prefix hits in
        ``computed_blocks``, which the caller then counts as computed). Returns the block copies
        (src, dst) that copy-on-write needs before the forward, or None when the pool is too
        short (nothing changed then)."""
        computed_blocks = computed_blocks or []
        num_computed = seq.num_computed_tokens + len(computed_blocks) * self.block_size
        num_have = len(seq.block_ids) + len(computed_blocks)
        num_new_blocks = max(0, self.blocks_needed(num_computed + num_new_tokens) - num_have)
        # The first new token lands in a partially filled block shared with a fork: copy it.
        cow_index = None
        if num_computed % self.block_size and num_new_tokens > 0:
            index = num_computed // self.block_size
            if index < num_have and self.pool.ref_counts[seq.block_ids[index]] > 1:
                cow_index = index
        num_alloc = num_new_blocks + (cow_index is not None)
        if num_alloc > self.pool.num_free_excluding(computed_blocks):
            return None
        self.seqs[seq.seq_id] = seq
        if computed_blocks:
            self.pool.touch(computed_blocks)
            seq.block_ids.extend(computed_blocks)
        copies = []
        if cow_index is not None:
            (dst,) = self.pool.allocate(1)
            src = seq.block_ids[cow_index]
            self.pool.free([src])
            seq.block_ids[cow_index] = dst
            copies.append((src, dst))
        if num_new_blocks:
            seq.block_ids.extend(self.pool.allocate(num_new_blocks))
        return copies

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's computed full blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        start = self.num_published.get(seq.seq_id, 0)
        if num_full <= start:
            return
        keys = self._keys_of(seq, num_full)
        for i in range(start, num_full):
            self.pool.cache_block(seq.block_ids[i], keys[i])
        self.num_published[seq.seq_id] = num_full

    def trim(self, seq: Sequence) -> None:
        """Free the tail blocks past what ``seq.num_tokens`` tokens need (lookahead slots that
        only rejected draft tokens used). They were allocated for this sequence alone."""
        keep = self.blocks_needed(seq.num_tokens)
        extra = seq.block_ids[keep:]
        if extra:
            self.pool.free(extra[::-1])
            del seq.block_ids[keep:]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares all the parent's blocks (n > 1, beam search)."""
        assert not child.block_ids
        child.block_ids = list(parent.block_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        self.pool.touch(child.block_ids)
        self.seqs[child.seq_id] = child
        num_full = parent.num_computed_tokens // self.block_size
        self.block_keys[child.seq_id] = list(self.block_keys.get(parent.seq_id, [])[:num_full])

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (tail first, so the tail is evicted first)."""
        self.pool.free(seq.block_ids[::-1])
        seq.block_ids = []
        self.seqs.pop(seq.seq_id, None)
        self.block_keys.pop(seq.seq_id, None)
        self.num_published.pop(seq.seq_id, None)

    def reset_prefix_keys(self, seq: Sequence) -> None:
        """Token ids of a sequence changed (beam reassignment): recompute its keys lazily."""
        self.block_keys.pop(seq.seq_id, None)
        self.num_published.pop(seq.seq_id, None)

    def check_integrity(self) -> None:
        """free + used == total, and every ref count equals the number of holders."""
        refs: dict[int, int] = {}
        for seq in self.seqs.values():
            for b in seq.block_ids:
                refs[b] = refs.get(b, 0) + 1
        self.pool.check_integrity(refs)
