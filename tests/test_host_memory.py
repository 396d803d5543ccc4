"""Weights on 2 MiB pages (kernels/host_memory.py): one arena, the same numbers, huge pages where
the kernel grants them."""
from __future__ import annotations

import pytest
import torch

from raylm.kernels import host_memory
from raylm.kernels.backend import TorchBackend
from raylm.workers.loader import load_model


def _anon_huge_kib(ptr: int) -> int:
    """AnonHugePages (KiB) of this process's mapping that holds address ``ptr``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def test_empty_is_aligned_writable_and_outlives_its_mapping_handle():
    t = host_memory.empty(3 << 20)  # 12 MiB of fp32
    assert t.dtype == torch.float32 and t.shape == (3 << 20,)
    assert t.data_ptr() % host_memory.HUGE_PAGE == 0
    view = t[5:10]
    del t
    view.fill_(2.5)
    assert view.sum().item() == 12.5
    assert host_memory.empty(0).numel() == 0
    with pytest.raises(ValueError, match="numel"):
        host_memory.empty(-1)


@pytest.mark.skipif(host_memory.thp_mode() not in ("always", "madvise"),
                    reason="the kernel grants no transparent huge pages")
def test_empty_gets_huge_pages_where_the_kernel_grants_them():
    t = host_memory.empty(8 << 20).fill_(1.0)  # 32 MiB, touched
    assert _anon_huge_kib(t.data_ptr()) >= 2048


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2's tiny model ties its LM head
def test_loaded_weights_move_into_one_arena_unchanged(tiny_model, monkeypatch, arch):
    path = tiny_model(arch)
    monkeypatch.setenv(host_memory.ENV, "0")
    plain = load_model(path, dtype=torch.float32, device="cpu", backend=TorchBackend())
    monkeypatch.setenv(host_memory.ENV, "1")
    moved = load_model(path, dtype=torch.float32, device="cpu", backend=TorchBackend())

    ptrs = sorted(p.data_ptr() for p in moved.parameters())
    span = ptrs[-1] - ptrs[0]
    total = sum(p.numel() * p.element_size() for p in moved.parameters())
    assert span < total + 64 * len(ptrs)  # one arena, in order, cache-line aligned
    assert all(p % 64 == 0 for p in ptrs)
    for (name, a), (_, b) in zip(plain.named_parameters(), moved.named_parameters()):
        assert torch.equal(a, b), name
    if arch == "qwen2":
        assert moved.lm_head.weight is moved.model.embed_tokens.weight


def test_huge_pages_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "yes")
    with pytest.raises(ValueError, match=host_memory.ENV):
        host_memory.enabled()
