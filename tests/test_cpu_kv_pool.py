"""The CPU KV pool: huge-page advice on allocation, and the prefault that `raylm serve`
turns on (the pool resident at start-up, its bytes kept)."""
import platform
import re
import sys

import pytest
import torch

from raylm.kernels.cpu_ops import load_extension

pytestmark = pytest.mark.skipif(load_extension() is None, reason="no C++ toolchain to build it")


def test_the_cpu_kv_pool_asks_for_huge_pages(monkeypatch):
    """allocate_kv_caches advises every CPU cache tensor (untouched, so the first write gets 2 MiB
    pages); a tensor smaller than one huge page is left alone."""
    import os
    import sys

    from raylm.workers import kv_cache

    advised = []
    real = kv_cache.advise_huge_pages
    monkeypatch.setattr(kv_cache, "advise_huge_pages", lambda t: advised.append(t) or real(t))
    caches = kv_cache.allocate_kv_caches(2, 64, 16, 4, 64, torch.float32, torch.device("cpu"))
    assert len(advised) == 4 and all(a is b for a, b in zip(advised, [t for kv in caches for t in kv]))
    assert all(torch.equal(t[0], torch.zeros_like(t[0])) for kv in caches for t in kv)
    has_thp = sys.platform.startswith("linux") and os.path.exists("/sys/kernel/mm/transparent_hugepage")
    assert real(torch.empty(8 << 20, dtype=torch.uint8)) == has_thp
    assert not real(torch.empty(1 << 20, dtype=torch.uint8))


def _resident_fraction(tensor: torch.Tensor) -> float:
    """Share of the tensor's 4 KiB pages that are mapped in RAM (mincore)."""
    import ctypes

    page = 4096
    start = tensor.data_ptr() // page * page
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    num_pages = -(-(end - start) // page)
    vec = (ctypes.c_ubyte * num_pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) == 0
    return sum(b & 1 for b in vec) / num_pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and madvise are Linux's")
def test_a_prefaulted_kv_pool_is_resident_and_keeps_its_bytes():
    """prefault=True maps the whole pool at allocation (what `raylm serve` does), where the lazy
    default leaves it unmapped; block 0 is still zero, and populating a tensor that already
    holds data leaves its bytes alone. 64 MiB tensors: fresh mmaps, never reused heap."""
    from raylm.workers import kv_cache

    args = (2, 4096, 16, 4, 64, torch.float32, torch.device("cpu"))
    probe = torch.empty(16 << 20)  # the size of one pool tensor
    fresh = _resident_fraction(probe) < 0.5  # False: the allocator hands out touched memory
    del probe  # (a process whose heap grew past its mmap threshold: seen once in the suite)
    lazy = kv_cache.allocate_kv_caches(*args)
    if fresh:
        assert all(_resident_fraction(t) < 0.5 for kv in lazy for t in kv)
    del lazy
    caches = kv_cache.allocate_kv_caches(*args, prefault=True)
    assert all(_resident_fraction(t) == 1.0 for kv in caches for t in kv)
    assert all(torch.equal(t[0], torch.zeros_like(t[0])) for kv in caches for t in kv)
    del caches

    data = torch.randn(3 << 20)
    kept = data.clone()
    kernel = tuple(int(x) for x in re.findall(r"\d+", platform.release())[:2])
    if kernel >= (5, 14):  # older kernels zero the pages instead (at allocation only)
        assert kv_cache.prefault_host([data]) == "MADV_POPULATE_WRITE"
        assert torch.equal(data, kept)


def test_the_engine_and_the_server_pass_prefault_kv_cache_on():
    """A user's switch reaches the cache config: `raylm serve` maps the pool up front unless
    --no-prefault-kv-cache; the offline engine (and the test suite) does not by default."""
    from raylm.cluster.config import EngineConfig
    from raylm.cluster.serve.app import AppConfig

    assert not EngineConfig.from_kwargs("m", device="cpu").cache.prefault_kv_cache
    assert EngineConfig.from_kwargs("m", device="cpu", prefault_kv_cache=True).cache.prefault_kv_cache
    assert AppConfig().engine_args()["prefault_kv_cache"] is True
    assert AppConfig(prefault_kv_cache=False).engine_args()["prefault_kv_cache"] is False
