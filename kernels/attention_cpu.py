"""Paged attention on CPU, read in place (kernels/csrc/paged_attention_cpu.cpp).

The kernel tiles each sequence's queries by KV group (all query heads of a KV head, several
tokens), scores 16 keys of a block per vector operation, runs the online softmax on whole score
vectors with a vectorised exp, and splits long sequences over key blocks when there are too few
(sequence, KV head) items to fill the cores. fp32 queries over an fp32, bf16 or fp16 cache; other
dtypes and the oracle use kernels/attention_ref.py. ``impl="legacy"`` selects the previous
per-key kernel (kept for A/B benchmarks only: RAYLM_ATTENTION_IMPL=legacy).
"""
from __future__ import annotations

import torch

from raylm.kernels.cpu_ops import load_extension
from raylm.kernels.metadata import AttentionMetadata

IMPLS = ("tiled", "legacy")
MAX_GROUP = {"tiled": 32, "legacy": 16}  # query heads per KV head the kernels hold
MAX_HEAD_DIM = 256
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the compiled ops read/write


def supports_shape(num_heads: int, num_kv_heads: int, head_dim: int, impl: str = "tiled") -> bool:
    """Whether the kernel holds this many query heads per KV head and this head size."""
    return num_heads // num_kv_heads <= MAX_GROUP[impl] and head_dim <= MAX_HEAD_DIM


def supports(query: torch.Tensor, k_cache: torch.Tensor, impl: str = "tiled") -> bool:
    return (query.device.type == "cpu" and query.dtype == torch.float32
            and k_cache.dtype in CACHE_DTYPES
            and supports_shape(query.shape[1], k_cache.shape[2], query.shape[2], impl))


def paged_attention_cpu(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], last dim contiguous
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    impl: str = "tiled",
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    ext = load_extension()
    assert ext is not None and impl in IMPLS
    if query.stride(2) != 1:
        query = query.contiguous()
    op = ext.paged_attention_cpu if impl == "tiled" else ext.paged_attention_legacy_cpu
    return op(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
              scale)
