"""CUDA-graph decode runner: padded batch sizes (CPU) and replay == eager forward (GPU only)."""
from __future__ import annotations

import pytest
import torch

from raylm.kernels.metadata import AttentionMetadata
from raylm.workers.cuda_graphs import CudaGraphRunner, capture_sizes


def test_capture_sizes_cover_the_max_batch():
    assert capture_sizes(1) == [1]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 32]
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 96, 128]
    with pytest.raises(ValueError, match="max_batch_size"):
        capture_sizes(0)


def test_runner_refuses_prefill_and_cpu():
    runner = CudaGraphRunner(model=None, kv_caches=[], block_size=16, max_batch_size=8,
                             max_seq_len=64, device="cpu")
    assert not runner.can_run(4, all_decode=True)  # no CUDA device
    assert not runner.can_run(4, all_decode=False)


class ToyAttentionModel(torch.nn.Module):
    """Embedding -> one paged-attention layer through the Triton backend -> residual."""

    def __init__(self, vocab=64, num_heads=4, num_kv_heads=2, head_dim=32):
        super().__init__()
        from raylm.kernels.backend_triton import TritonBackend

        self.backend = TritonBackend()
        self.shape = (num_heads, num_kv_heads, head_dim)
        hidden = num_heads * head_dim
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.qkv = torch.nn.Linear(hidden, (num_heads + 2 * num_kv_heads) * head_dim)
        self.o = torch.nn.Linear(hidden, hidden)

    def forward(self, input_ids, positions, kv_caches, meta):
        num_heads, num_kv_heads, head_dim = self.shape
        h = self.embed(input_ids) + positions[:, None].to(torch.float32) * 1e-3
        q, k, v = self.qkv(h).split([num_heads * head_dim, num_kv_heads * head_dim,
                                     num_kv_heads * head_dim], dim=-1)
        k = k.reshape(-1, num_kv_heads, head_dim)
        v = v.reshape(-1, num_kv_heads, head_dim)
        self.backend.write_kv(k, v, *kv_caches[0], meta.slot_mapping)
        o = self.backend.attention(q.reshape(-1, num_heads, head_dim), *kv_caches[0], meta,
                                   head_dim ** -0.5)
        return h + self.o(o.reshape(-1, num_heads * head_dim))


def _decode_meta(seq_lens, tables, block_size, device):
    n = len(seq_lens)
    pos = torch.tensor([s - 1 for s in seq_lens], device=device)
    slots = tables[torch.arange(n, device=device), pos // block_size].long() * block_size + (
        pos % block_size)
    meta = AttentionMetadata(slots, torch.arange(n + 1, dtype=torch.int32, device=device),
                             torch.tensor(seq_lens, dtype=torch.int32, device=device), tables,
                             block_size, 1, max(seq_lens), [1] * n, list(seq_lens))
    return pos, meta


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_matches_eager_decode():
    device, block_size = torch.device("cuda"), 16
    torch.manual_seed(0)
    model = ToyAttentionModel().to(device)
    cache_shape = (32, block_size, 2, 32)
    caches = [(torch.randn(cache_shape, device=device), torch.randn(cache_shape, device=device))]
    eager_caches = [(caches[0][0].clone(), caches[0][1].clone())]
    runner = CudaGraphRunner(model, caches, block_size, max_batch_size=8, max_seq_len=256,
                             device=device)
    tables = torch.randperm(32, device=device)[:15].view(3, 5).to(torch.int32)
    seq_lens = [5, 17, 70]
    with torch.no_grad():
        for _ in range(3):  # several steps: the same graph replays over new inputs
            input_ids = torch.randint(0, 64, (3,), device=device)
            positions, meta = _decode_meta(seq_lens, tables, block_size, device)
            assert runner.can_run(3, all_decode=True)
            got = runner.run(input_ids, positions, meta).clone()
            want = model.forward(input_ids, positions, eager_caches, meta)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(caches[0][0], eager_caches[0][0])
            seq_lens = [s + 1 for s in seq_lens]
