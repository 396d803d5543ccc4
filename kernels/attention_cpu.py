"""Paged attention on CPU without the gather copy: a small C++/OpenMP op built on first use.

Decode attention is memory bound; the torch reference copies every sequence's K/V out of its
blocks before attending (three passes over the KV bytes), this op reads them once in place.
It is built with torch's cpp_extension the first time it is needed (cached afterwards) and
falls back to the reference when no compiler is available. fp32 only; other dtypes and the
oracle use kernels/attention_ref.py.
"""
from __future__ import annotations

import functools
import logging
import pathlib

import torch

from raylm.kernels.metadata import AttentionMetadata

logger = logging.getLogger(__name__)
_SOURCE = pathlib.Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp"


@functools.lru_cache(maxsize=1)
def load_extension():
    """The compiled module, or None when it cannot be built here (logged once)."""
    try:
        from torch.utils.cpp_extension import load

        logger.info("loading the CPU paged-attention op (compiled on first use, then cached)")
        return load(name="raylm_paged_attention_cpu", sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the reference
        logger.warning("CPU paged-attention op unavailable (%s); using the torch reference", e)
        return None


def supports(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (query.device.type == "cpu" and query.dtype == torch.float32
            and k_cache.dtype == torch.float32 and query.shape[1] // k_cache.shape[2] <= 16)


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
