"""The compiled CPU paged attention equals its torch reference on ragged, mixed, paged batches
(GQA groups, 16-bit caches, long sequences split over key blocks, strided queries), and the
compiled KV write equals its reference."""
import itertools

import pytest
import torch

from raylm.kernels.attention_cpu import paged_attention_cpu
from raylm.kernels.attention_ref import paged_attention_ref
from raylm.kernels.backend import CpuBackend
from raylm.kernels.cpu_ops import load_extension
from raylm.kernels.kv_write_ref import write_kv_ref
from raylm.kernels.metadata import AttentionMetadata

pytestmark = pytest.mark.skipif(load_extension() is None, reason="no C++ toolchain to build it")


def _case(q_lens, s_lens, block_size, num_kv_heads, group, head_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for s in s_lens) + 7
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g)  # shuffled, non-contiguous blocks
    max_blocks = max(-(-s // block_size) for s in s_lens)
    tables = torch.zeros(len(s_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, s in enumerate(s_lens):
        n = -(-s // block_size)
        tables[i, :n] = perm[used : used + n]
        used += n
    num_tokens = sum(q_lens)
    query = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=g)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(num_tokens, dtype=torch.long),
        query_start_loc=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32),
        seq_lens=torch.tensor(s_lens, dtype=torch.int32), block_tables=tables,
        block_size=block_size, max_query_len=max(q_lens), max_seq_len=max(s_lens),
        query_lens_host=list(q_lens), seq_lens_host=list(s_lens))
    return query, k_cache, v_cache, meta


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,group", [(4, 1), (4, 2), (2, 4), (1, 8)])
@pytest.mark.parametrize("head_dim", [64, 40])  # the vector path; the scalar fallback
def test_mixed_batch_matches_reference(block_size, num_kv_heads, group, head_dim):
    B = block_size
    # decodes at 1, B-1, B, B+1 and several blocks; a full prompt; chunks starting mid-block
    # (context 3B-5 and 3B-3) and one starting on a block boundary (context B).
    q_lens = [1, 1, 1, 1, 1, 20, 7, B + 3, 2 * B]
    s_lens = [1, B - 1, B, B + 1, 5 * B + 3, 20, 3 * B + 2, 4 * B, 3 * B]
    query, k_cache, v_cache, meta = _case(q_lens, s_lens, B, num_kv_heads, group, head_dim)
    ref = paged_attention_ref(query, k_cache, v_cache, meta, scale=0.17)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale=0.17)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)  # fp32


@pytest.mark.parametrize("head_dim", [32, 80, 96, 128, 256])
def test_every_vector_head_size_matches_reference(head_dim):
    """Each head size has its own register blocking (rows of P.V per pass): prefill tiles of
    odd row counts and decodes, fp32 and bf16 caches."""
    q_lens, s_lens = [1, 13, 1, 21], [37, 13, 50, 40]
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-5)):
        query, k_cache, v_cache, meta = _case(q_lens, s_lens, 16, 2, 3, head_dim)
        k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
        ref = paged_attention_ref(query, k_cache.float(), v_cache.float(), meta, scale=0.11)
        out = paged_attention_cpu(query, k_cache, v_cache, meta, scale=0.11)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (2, 2), (2, 4), (1, 8)])
def test_16bit_cache_matches_reference(cache_dtype, num_kv_heads, group):
    q_lens, s_lens = [1, 1, 9, 13], [37, 16, 40, 13]
    query, k_cache, v_cache, meta = _case(q_lens, s_lens, 16, num_kv_heads, group, head_dim=64)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    ref = paged_attention_ref(query, k_cache, v_cache, meta, scale=0.2)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale=0.2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)  # same rounded K/V, fp32 math


@pytest.mark.parametrize("q_lens,s_lens", [([1], [9000]), ([5], [9003]), ([1, 1], [4100, 30])])
def test_long_sequences_split_over_key_blocks_match_reference(q_lens, s_lens):
    """Few (sequence, KV head) items and many keys: the kernel splits the keys over the cores
    and merges the partial softmaxes (a no-op split on one thread must still be exact)."""
    query, k_cache, v_cache, meta = _case(q_lens, s_lens, 16, 1, 8, head_dim=64)
    ref = paged_attention_ref(query, k_cache, v_cache, meta, scale=0.125)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale=0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_legacy_kernel_still_matches_reference():
    """RAYLM_ATTENTION_IMPL=legacy (A/B benchmarks) computes the same attention."""
    query, k_cache, v_cache, meta = _case([1, 1, 7], [40, 3, 30], 16, 2, 2, head_dim=64)
    ref = paged_attention_ref(query, k_cache, v_cache, meta, scale=0.125)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale=0.125, impl="legacy")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_strided_query_view():
    query, k_cache, v_cache, meta = _case([1, 9], [40, 9], 16, 2, 2, head_dim=64)
    wide = torch.randn(query.shape[0], query.shape[1] * 2, query.shape[2])
    wide[:, : query.shape[1]] = query
    view = wide[:, : query.shape[1]]  # non-contiguous rows, like q split from a fused qkv
    torch.testing.assert_close(paged_attention_cpu(view, k_cache, v_cache, meta, 0.125),
                               paged_attention_ref(query, k_cache, v_cache, meta, 0.125),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 7, 130])
def test_kv_write_matches_reference(cache_dtype, num_tokens):
    """The compiled scatter writes what the torch reference writes: k/v as strided views of a
    fused qkv row, padding slots (-1) skipped, every cache dtype; the rest of the cache stays."""
    g = torch.Generator().manual_seed(num_tokens)
    blocks, block_size, kv_heads, head_dim = 20, 16, 2, 64
    qkv = torch.randn(num_tokens, (4 + 2 * kv_heads) * head_dim, generator=g)
    k = qkv[:, 4 * head_dim:(4 + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    v = qkv[:, (4 + kv_heads) * head_dim:].view(num_tokens, kv_heads, head_dim)
    slots = torch.randperm(blocks * block_size, generator=g)[:num_tokens]
    slots[::3] = -1
    caches = [torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(cache_dtype)
              for _ in range(2)]
    expected = [c.clone() for c in caches]
    write_kv_ref(k, v, *expected, slots)
    backend = CpuBackend()
    backend.write_kv(k, v, *caches, slots)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="slot out of range"):
        load_extension().write_kv_cpu(k, v, *caches, torch.full_like(slots, blocks * block_size))
