"""Sizing and allocating the paged KV cache tensors (layout: DESIGN.md section 4)."""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

# Without an explicit kv_cache_memory, the CPU pool takes this share of the free RAM, capped.
CPU_KV_FRACTION = 0.25
CPU_KV_CAP_BYTES = 8 << 30


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """K and V of every layer for one block of tokens."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def available_host_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30


def num_blocks_for_cpu(kv_cache_memory: int | None, block_bytes: int, num_ranks: int = 1) -> int:
    """``kv_cache_memory`` is the whole replica's budget; each of ``num_ranks`` ranks sharing
    the host's RAM gets an equal part (its blocks hold only its share of the KV heads)."""
    budget = kv_cache_memory
    if budget is None:
        budget = min(int(available_host_memory() * CPU_KV_FRACTION), CPU_KV_CAP_BYTES)
    budget //= num_ranks
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory={budget} bytes holds no KV block ({block_bytes} bytes each)")
    return num_blocks


def num_blocks_for_gpu(device: torch.device, utilization: float, block_bytes: int) -> int:
    """Give ``utilization`` of the device memory, minus what the profiled forward used, to KV."""
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    budget = int(total * utilization) - peak - (total - free - torch.cuda.memory_allocated(device))
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"gpu_memory_utilization={utilization} leaves no room for the KV cache "
            f"(peak {peak / 2**30:.2f} GiB of {total / 2**30:.2f} GiB)")
    return num_blocks


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype, device: torch.device
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Uninitialised, so untouched host pages cost nothing; block 0 is zeroed because masked
    (padding) positions of the reference attention read it, and 0 * garbage could be NaN."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = []
    for _ in range(num_layers):
        k, v = (torch.empty(shape, dtype=dtype, device=device) for _ in range(2))
        k[0].zero_()
        v[0].zero_()
        caches.append((k, v))
    return caches
