"""Sizing and allocating the paged KV cache tensors (layout: DESIGN.md section 4)."""
from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import time

import torch

from raylm.kernels.host_memory import MADV_POPULATE_WRITE, advise_huge_pages, madvise

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
                       head_dim: int, dtype: torch.dtype, device: torch.device,
                       prefault: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Uninitialised, so untouched host pages cost nothing until used (``prefault`` maps them
    all now, see ``prefault_host``); block 0 is zeroed because masked (padding) positions of
    the reference attention read it, and 0 * garbage could be NaN."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = []
    for _ in range(num_layers):
        k, v = (torch.empty(shape, dtype=dtype, device=device) for _ in range(2))
        if device.type == "cpu":  # decode attention reads each sequence's blocks from all over
            # the pool: on 4 KiB pages nearly every block read starts with a TLB miss (a
            # 200-sequence decode batch: 7.0 -> 6.0 ms per layer on 2 MiB pages)
            advise_huge_pages(k)
            advise_huge_pages(v)
        k[0].zero_()
        v[0].zero_()
        caches.append((k, v))
    if prefault and device.type == "cpu":
        start = time.perf_counter()
        tensors = [t for kv in caches for t in kv]
        how = prefault_host(tensors)
        logger.info("KV cache: mapped all %.1f MiB up front (%s) in %.2fs",
                    sum(t.numel() * t.element_size() for t in tensors) / 2**20, how,
                    time.perf_counter() - start)
    return caches


def prefault_host(tensors: list[torch.Tensor]) -> str:
    """Map every page of untouched host tensors now, so that no step pays for it later.

    The pool hands out blocks in LRU order, so a CPU server touches fresh pool memory for a
    long while: each first write to a 2 MiB page is a fault that zeroes it, inside a step
    (3 % of a 200-prompt bench run's CPU time, in write_rows). ``MADV_POPULATE_WRITE`` (Linux
    >= 5.14) maps the pages without writing to them, in chunks over as many threads as torch
    computes with; elsewhere the tensors are zeroed. Returns which of the two ran."""
    if sys.platform.startswith("linux"):
        chunks = []
        for tensor in tensors:  # page-aligned spans (populating never changes a page's bytes)
            start = tensor.data_ptr() // _SMALL_PAGE * _SMALL_PAGE
            end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
            chunks += [(at, min(_PREFAULT_CHUNK, end - at))
                       for at in range(start, end, _PREFAULT_CHUNK)]

        def populate(chunk: tuple[int, int]) -> bool:  # ctypes drops the GIL for the call
            return madvise(*chunk, MADV_POPULATE_WRITE)

        with concurrent.futures.ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            done = list(pool.map(populate, chunks))
        if all(done):
            return "MADV_POPULATE_WRITE"
    for tensor in tensors:  # an older kernel (EINVAL) or not Linux: write the pages
        tensor.zero_()
    return "zeroed"


_PREFAULT_CHUNK = 64 << 20
_SMALL_PAGE = 4096
