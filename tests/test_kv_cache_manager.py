"""KVCacheManager: allocation, prefix caching, LRU eviction, forks and copy-on-write."""
from core_builders import make_request

from raylm.cluster.kv_cache_manager import KVCacheManager


def _admit(kv: KVCacheManager, seq) -> int:
    hits, n = kv.get_computed_blocks(seq)
    assert kv.allocate_slots(seq, seq.num_tokens - n, hits) is not None
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_full_blocks(seq)
    return n


def test_allocate_and_free_returns_every_block():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    seq = make_request(9).seqs[0]
    assert _admit(kv, seq) == 0
    assert len(seq.block_ids) == 3 and kv.num_free_blocks == 7
    kv.check_integrity()
    kv.free(seq)
    assert kv.num_free_blocks == 10
    kv.check_integrity()


def test_pool_too_small_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    seq = make_request(9).seqs[0]
    assert kv.allocate_slots(seq, 9) is None
    assert seq.block_ids == [] and kv.num_free_blocks == 2


def test_prefix_hit_shares_full_blocks_but_never_the_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request(12).seqs[0]
    _admit(kv, a)
    b = make_request(12).seqs[0]  # same tokens
    hits, n = kv.get_computed_blocks(b)
    # 12 tokens = 3 full blocks, but the last token must be computed: only 2 blocks hit.
    assert n == 8 and hits == a.block_ids[:2]
    kv.allocate_slots(b, 12 - n, hits)
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert kv.prefix_hit_rate > 0
    kv.check_integrity()


def test_freed_cached_blocks_are_reused_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request(9).seqs[0]
    _admit(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4
    b = make_request(9).seqs[0]
    hits, n = kv.get_computed_blocks(b)
    assert n == 8  # cached blocks survive being freed
    # A different prompt needing all 4 blocks evicts the cache.
    c = make_request(16, first_token=100).seqs[0]
    assert kv.allocate_slots(c, 16) is not None
    kv.free(c)
    d = make_request(9).seqs[0]
    assert kv.get_computed_blocks(d) == ([], 0)
    kv.check_integrity()


def test_fork_shares_blocks_and_copies_partial_block_on_write():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    parent = make_request(6).seqs[0]
    _admit(kv, parent)
    req = parent.request
    from raylm.cluster.request import Sequence

    child = Sequence(req, list(parent.token_ids), parent.num_prompt_tokens, index=1)
    kv.fork(parent, child)
    assert child.block_ids == parent.block_ids
    used_before = kv.num_total_blocks - kv.num_free_blocks
    kv.check_integrity()
    child.token_ids.append(5)
    copies = kv.allocate_slots(child, 1)
    # The shared full block stays shared; the partial one is copied.
    assert copies == [(parent.block_ids[1], child.block_ids[1])]
    assert child.block_ids[0] == parent.block_ids[0]
    assert kv.num_total_blocks - kv.num_free_blocks == used_before + 1
    kv.check_integrity()
    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == 16
    kv.check_integrity()
