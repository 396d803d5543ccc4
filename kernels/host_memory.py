"""Host memory on 2 MiB pages for what a CPU decode step streams: the model's weights.

A batch-1 decode step reads every weight once, front to back. On 4 KiB pages that read takes a
TLB miss every 4 KiB and the hardware prefetcher stops at every page; on 2 MiB pages it does
neither. Most Linux distributions run transparent huge pages in ``madvise`` mode, where only
memory that asks for them gets them, and torch's allocator does not ask (unless the process was
started with ``THP_MEM_ALLOC_ENABLE=1``). Measured on the 2-core dev VM over 166 MB, both page
sizes alternating in one process: torch's sum 25.0 -> 31.3 GB/s, raylm's streaming linear kernel
23.4 -> 30.5 GB/s (medians of 40); batch-1 decode of the bench model 6.46 -> 5.33 ms/token.

:func:`empty` hands out a tensor on a fresh mapping, aligned to 2 MiB, whose pages are advised
to be huge (``madvise(MADV_HUGEPAGE)``) before anything touches them; the CPU KV pool advises its tensors
the same way (workers/kv_cache.py). Where the kernel has THP off (``never``) or is not Linux, the
same memory comes on ordinary pages: only slower.

``RAYLM_CPU_HUGE_PAGES=0`` (read here only) leaves the weights where torch put them, for A/B runs.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import pathlib
import sys

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ENV = "RAYLM_CPU_HUGE_PAGES"
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def enabled() -> bool:
    value = os.environ.get(ENV, "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def thp_mode() -> str:
    """The kernel's transparent huge page mode (always / madvise / never), '' if unknown."""
    try:
        text = _THP_MODE.read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else ""


def empty(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor of ``numel`` elements that starts on a 2 MiB boundary, on
    memory advised to 2 MiB pages before anything touches it."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    # A fresh private mapping, not torch.empty: below malloc's mmap threshold (up to 32 MiB)
    # torch.empty can hand back heap pages already touched on 4 KiB pages, which the advice no
    # longer changes. (A shared anonymous mapping would be shmem, under THP's separate shmem
    # setting.) The tensor keeps the mapping alive; + slack to start on a 2 MiB boundary.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # [nbytes + slack]
    offset = -raw.data_ptr() % HUGE_PAGE
    out = raw[offset : offset + nbytes]  # [nbytes]
    advise_huge_pages(out)
    return out.view(dtype)  # [numel]


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back the untouched host tensor with 2 MiB pages (``madvise(MADV_HUGEPAGE)``
    over the whole 2 MiB pages inside it). Returns whether the advice was taken; harmless where
    it is not (no Linux, THP ``never``)."""
    if not sys.platform.startswith("linux"):
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = (start + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    last = end // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return False
    return madvise(first, last - first, MADV_HUGEPAGE)


MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def madvise(address: int, length: int, advice: int) -> bool:
    """madvise(2) on [address, address + length) (address page-aligned); True on success."""
    return _libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice) == 0


def move_to_huge_pages(module: torch.nn.Module) -> int:
    """Re-home every CPU parameter and buffer of ``module`` into one 2 MiB-page arena, in
    registration order (for a decoder: the order a step reads them). Tied parameters stay tied.
    Returns the bytes moved."""
    tensors = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "cpu" and t.numel() > 0:
            tensors.setdefault(id(t), t)
    if not tensors:
        return 0
    align = 64  # a cache line: every tensor starts on one
    offsets, total = [], 0
    for t in tensors.values():
        offsets.append(total)
        total += (t.numel() * t.element_size() + align - 1) // align * align
    arena = empty(total, torch.uint8)  # [total bytes]
    with torch.no_grad():
        for t, offset in zip(tensors.values(), offsets):
            nbytes = t.numel() * t.element_size()
            home = arena[offset : offset + nbytes].view(t.dtype).view(t.shape)
            home.copy_(t)
            t.data = home  # the old storage is freed here, one tensor at a time
    logger.info("weights on 2 MiB pages: %.1f MiB in one arena (transparent huge pages: %s)",
                total / 2**20, thp_mode() or "unknown")
    return total
