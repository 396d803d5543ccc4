"""Unified paged attention in Triton: one launch for a mixed batch of prompt chunks and decodes.

Layout and semantics are those of :func:`raylm.kernels.attention_ref.paged_attention_ref`
(DESIGN.md section 4). One program handles ``BLOCK_Q`` query tokens of one sequence times all
query heads of one KV head (GQA/MQA: the group shares every K/V tile it loads), and walks the
sequence's keys through its block table with an online softmax. Programs are packed over the
flattened query tokens, so a batch with one long prompt chunk and many decodes wastes at most one
program per sequence; a program finds its sequence by binary search over ``query_start_loc``.

Split-K (flash-decoding): for long contexts with few sequences the key range is cut into
``num_splits`` partitions; each writes a normalised partial output and its log-sum-exp, and a
second kernel merges them. Every grid size comes from host-side upper bounds
(``meta.max_query_len``, ``meta.max_seq_len``, ``num_seqs``, ``num_tokens``), never from device
lengths, so the launches can be captured in a CUDA graph.
"""
from __future__ import annotations

import math

import torch

from raylm.kernels import triton_utils  # noqa: F401  (sets TRITON_INTERPRET before @triton.jit)
from raylm.kernels.metadata import AttentionMetadata
from raylm.kernels.triton_utils import (
    SUPPORTED_DTYPES, check_same_device, check_tensor, interpreting, next_power_of_2)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

LOG2E = 1.4426950408889634
# A split-K partition shorter than this costs more to merge than it saves.
MIN_PARTITION_TOKENS = 256
MAX_SPLITS = 64


@triton.jit
def _find_seq_idx(query_start_loc_ptr, q_block_id, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest i with first_q_block(i) <= q_block_id (binary search over query_start_loc)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q
        if BLOCK_Q > 1:
            first += mid  # each sequence may start mid-block: one block of slack per sequence
        go_right = first <= q_block_id
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs", "partition_size"])
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim], or fp32 [num_tokens, num_heads, splits, head_dim]
    lse_ptr,  # fp32 [num_tokens, num_heads, splits] (SPLIT_K only), log2 domain
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # int32 [num_seqs]
    query_start_loc_ptr,  # int32 [num_seqs + 1]
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
    partition_size,  # keys per split-K partition (multiple of TILE_N)
    stride_q_tok, stride_q_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_o_tok, stride_o_head, stride_o_split,
    stride_lse_tok, stride_lse_head,
    stride_bt_seq,
    QUERIES_PER_KV: tl.constexpr,
    QUERIES_PER_KV_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q tokens x QUERIES_PER_KV_PAD heads (>= 16)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV cache block size (tokens per page)
    TILE_N: tl.constexpr,  # keys per inner iteration (may span several pages)
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16 bit patterns as ints
):
    q_block_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_idx = _find_seq_idx(query_start_loc_ptr, q_block_id, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq_idx)
    q_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
    first_q_block = q_start // BLOCK_Q
    if BLOCK_Q > 1:
        first_q_block += seq_idx
    q_block_local = q_block_id - first_q_block
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    q_local = q_block_local * BLOCK_Q + offs_m // QUERIES_PER_KV_PAD  # [BLOCK_M] index in the chunk
    head_in_group = offs_m % QUERIES_PER_KV_PAD
    row_valid = ((offs_m // QUERIES_PER_KV_PAD) < BLOCK_Q) & (q_local < q_len) & (
        head_in_group < QUERIES_PER_KV)
    head = (kv_head * QUERIES_PER_KV + head_in_group).to(tl.int64)  # [BLOCK_M]
    token = (q_start + q_local).to(tl.int64)  # [BLOCK_M]
    row_mask = row_valid[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + token[:, None] * stride_q_tok + head[:, None] * stride_q_head
                + offs_d[None, :], mask=row_mask, other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]
    if UPCAST_DOT:
        q = q.to(tl.float32)
    q_pos = context_len + q_local  # [BLOCK_M] absolute position of each query row

    # Causal: this q block sees keys [0, context_len + last query index + 1).
    kv_end = context_len + tl.minimum((q_block_local + 1) * BLOCK_Q, q_len)
    kv_start = 0
    if SPLIT_K:
        kv_start = split * partition_size
        kv_end = tl.minimum(kv_end, kv_start + partition_size)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    block_table = block_tables_ptr + seq_idx.to(tl.int64) * stride_bt_seq
    k_head = k_cache_ptr + kv_head.to(tl.int64) * stride_k_head
    v_head = v_cache_ptr + kv_head.to(tl.int64) * stride_v_head
    for tile_start in range(kv_start, kv_end, TILE_N):
        offs_n = tile_start + tl.arange(0, TILE_N)  # [TILE_N] absolute key positions
        n_valid = offs_n < kv_end
        block_ids = tl.load(block_table + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
        slot_in_block = (offs_n % BLOCK_SIZE).to(tl.int64)
        k = tl.load(k_head + block_ids[None, :] * stride_k_block
                    + slot_in_block[None, :] * stride_k_slot + offs_d[:, None],
                    mask=n_valid[None, :] & d_mask[:, None], other=0.0)  # [HEAD_DIM_PAD, TILE_N]
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
        visible = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no key yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + block_ids[:, None] * stride_v_block
                    + slot_in_block[:, None] * stride_v_slot + offs_d[None, :],
                    mask=n_valid[:, None] & d_mask[None, :], other=0.0)  # [TILE_N, HEAD_DIM_PAD]
        if UPCAST_DOT:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    out_offs = token[:, None] * stride_o_tok + head[:, None] * stride_o_head + offs_d[None, :]
    if SPLIT_K:
        out_offs += split * stride_o_split
        tl.store(out_ptr + out_offs, acc, mask=row_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(lse_ptr + token * stride_lse_tok + head * stride_lse_head + split, lse,
                 mask=row_valid)
    else:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _merge_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    partial_ptr,  # fp32 [num_tokens, num_heads, splits, head_dim]
    lse_ptr,  # fp32 [num_tokens, num_heads, splits], log2 domain
    stride_o_tok, stride_o_head,
    stride_p_tok, stride_p_head, stride_p_split,
    stride_lse_tok, stride_lse_head,
    NUM_SPLITS: tl.constexpr,
    NUM_SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, NUM_SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + token * stride_lse_tok + head * stride_lse_head + offs_s,
                  mask=s_mask, other=float("-inf"))  # [NUM_SPLITS_PAD]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp2(lse - lse_max)  # 0 for partitions that saw no key
    total = tl.sum(weight, 0)
    total = tl.where(total == 0.0, 1.0, total)
    partial = tl.load(partial_ptr + token * stride_p_tok + head * stride_p_head
                      + offs_s[:, None] * stride_p_split + offs_d[None, :],
                      mask=(s_mask & (weight > 0.0))[:, None] & d_mask[None, :], other=0.0)
    merged = tl.sum(partial * weight[:, None], 0) / total  # [HEAD_DIM_PAD]
    tl.store(out_ptr + token * stride_o_tok + head * stride_o_head + offs_d,
             merged.to(out_ptr.dtype.element_ty), mask=d_mask)


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def choose_num_splits(meta: AttentionMetadata, num_kv_heads: int, device: torch.device) -> int:
    """Split-K only pays for decode-only batches whose (seq, kv head) programs underfill the GPU."""
    if meta.max_query_len > 1 or device.type != "cuda":
        return 1
    programs = meta.num_seqs * num_kv_heads
    num_sms = _num_sms(device)
    if programs >= num_sms:
        return 1
    splits = min(math.ceil(2 * num_sms / programs),
                 math.ceil(meta.max_seq_len / MIN_PARTITION_TOKENS), MAX_SPLITS)
    return max(1, splits)


def _check_inputs(query, k_cache, v_cache, meta: AttentionMetadata) -> None:
    check_tensor("query", query, 3, SUPPORTED_DTYPES)
    check_tensor("k_cache", k_cache, 4, SUPPORTED_DTYPES)
    check_tensor("v_cache", v_cache, 4, SUPPORTED_DTYPES)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} differ")
    if not (query.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"query/k_cache/v_cache dtypes differ: {query.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if query.shape[2] != head_dim:
        raise ValueError(f"query head_dim {query.shape[2]} != cache head_dim {head_dim}")
    if query.shape[1] % num_kv_heads:
        raise ValueError(f"query heads {query.shape[1]} not a multiple of kv heads {num_kv_heads}")
    if block_size != meta.block_size:
        raise ValueError(f"meta.block_size {meta.block_size} != k_cache block size {block_size}")
    check_tensor("meta.block_tables", meta.block_tables, 2, (torch.int32,))
    check_tensor("meta.seq_lens", meta.seq_lens, 1, (torch.int32,))
    check_tensor("meta.query_start_loc", meta.query_start_loc, 1, (torch.int32,))
    if meta.query_start_loc.shape[0] != meta.num_seqs + 1:
        raise ValueError(f"meta.query_start_loc must have num_seqs + 1 = {meta.num_seqs + 1} "
                         f"entries, got {meta.query_start_loc.shape[0]}")
    check_same_device(query=query, k_cache=k_cache, v_cache=v_cache,
                      block_tables=meta.block_tables, seq_lens=meta.seq_lens,
                      query_start_loc=meta.query_start_loc)


def paged_attention_triton(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    num_splits: int | None = None,  # None = choose; 1 = no split-K; >1 forces split-K
    tile_n: int | None = None,  # keys per inner iteration; None = choose
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Attention of this step's queries over the paged cache (K/V of this step already written)."""
    _check_inputs(query, k_cache, v_cache, meta)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must match query {tuple(query.shape)} {query.dtype}")
    num_seqs = meta.num_seqs
    if num_tokens == 0 or num_seqs == 0:
        return out

    queries_per_kv = num_heads // num_kv_heads
    qpk_pad = next_power_of_2(queries_per_kv)
    head_dim_pad = max(16, next_power_of_2(head_dim))
    # Wide rows (fp32, or head_dim 256) take smaller tiles so K/V stages fit in shared memory.
    row_bytes = head_dim_pad * query.element_size()
    # Decode-only steps: one token per program; prompt chunks: fill the rows with tokens x heads.
    target_rows = 64 if row_bytes <= 256 else 32
    block_q = 1 if meta.max_query_len <= 1 else max(1, target_rows // qpk_pad)
    block_m = max(16, block_q * qpk_pad)
    num_q_blocks = num_tokens if block_q == 1 else num_tokens // block_q + num_seqs
    if tile_n is None:
        tile_n = 64 if row_bytes <= 256 else (32 if row_bytes <= 512 else 16)
    if tile_n < 16 or tile_n & (tile_n - 1):
        raise ValueError(f"tile_n must be a power of two >= 16, got {tile_n}")
    if num_splits is None:
        num_splits = choose_num_splits(meta, num_kv_heads, query.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    partition_size = tile_n * math.ceil(max(1, meta.max_seq_len) / (num_splits * tile_n))
    split_k = num_splits > 1
    upcast_dot = interpreting() and query.dtype == torch.bfloat16
    dot_precision = "ieee" if query.dtype == torch.float32 or upcast_dot else "tf32"

    if split_k:
        partial = torch.empty((num_tokens, num_heads, num_splits, head_dim),
                              dtype=torch.float32, device=query.device)
        lse = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32,
                          device=query.device)
        target, stride_split = partial, partial.stride(2)
    else:
        lse, target, stride_split = out, out, 0  # lse unused without SPLIT_K
    grid = (num_q_blocks, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        target, lse, query, k_cache, v_cache,
        meta.block_tables, meta.seq_lens, meta.query_start_loc,
        scale * LOG2E, num_seqs, partition_size,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        target.stride(0), target.stride(1), stride_split,
        lse.stride(0), lse.stride(1),
        meta.block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv, QUERIES_PER_KV_PAD=qpk_pad,
        BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, TILE_N=tile_n, SPLIT_K=split_k, DOT_PRECISION=dot_precision,
        UPCAST_DOT=upcast_dot,
        num_warps=4 if head_dim_pad <= 128 else 8,
    )
    if split_k:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, partial, lse,
            out.stride(0), out.stride(1),
            partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1),
            NUM_SPLITS=num_splits, NUM_SPLITS_PAD=next_power_of_2(num_splits),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        )
    return out
