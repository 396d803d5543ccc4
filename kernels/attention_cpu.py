"""Paged attention on CPU without the gather copy (kernels/csrc/paged_attention_cpu.cpp).

Decode attention is memory bound; the torch reference copies every sequence's K/V out of its
blocks before attending (three passes over the KV bytes), this op reads them once in place.
fp32 queries over an fp32, bf16 or fp16 cache; other dtypes and the oracle use
kernels/attention_ref.py.
"""
from __future__ import annotations

import torch

from raylm.kernels.cpu_ops import load_extension
from raylm.kernels.metadata import AttentionMetadata


def supports(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (query.device.type == "cpu" and query.dtype == torch.float32
            and k_cache.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and query.shape[1] // k_cache.shape[2] <= 16)


def paged_attention_cpu(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], last dim contiguous
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    ext = load_extension()
    assert ext is not None
    if query.stride(2) != 1:
        query = query.contiguous()
    return ext.paged_attention_cpu(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                   meta.query_start_loc, scale)
