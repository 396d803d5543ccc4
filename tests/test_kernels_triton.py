"""Triton kernels against their torch references (kernels/*_ref.py).

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 must be
set before the kernel modules are imported: Triton reads it when a kernel is decorated). With a
GPU the same tests run on CUDA. Outputs and unused cache slots are poisoned with NaN, so a kernel
that skips an element or reads one it must not fails loudly.

Tolerances (max abs error vs the reference, plus rtol * |reference|): fp32 2e-5; fp16 2e-3;
bf16 2e-2 (the interpreter truncates fp32 -> bf16 instead of rounding: up to one ulp apart).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from raylm.kernels.attention_ref import paged_attention_ref  # noqa: E402
from raylm.kernels.attention_triton import paged_attention_triton  # noqa: E402
from raylm.kernels.backend import BACKEND_ENV, TorchBackend, get_backend  # noqa: E402
from raylm.kernels.backend_triton import TritonBackend  # noqa: E402
from raylm.kernels.kv_write_ref import write_kv_ref  # noqa: E402
from raylm.kernels.kv_write_triton import write_kv_triton  # noqa: E402
from raylm.kernels.metadata import AttentionMetadata  # noqa: E402
from raylm.kernels.norm_ref import add_rms_norm_ref, rms_norm_ref  # noqa: E402
from raylm.kernels.norm_triton import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from raylm.kernels.rotary_ref import apply_rotary_ref  # noqa: E402
from raylm.kernels.rotary_triton import apply_rotary_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), "kernel left NaN (unwritten or poisoned element read)"
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def make_batch(q_lens, seq_lens, block_size=16, num_kv_heads=2, queries_per_kv=4, head_dim=32,
               dtype=torch.float32, seed=0):
    """A step over shuffled, non-contiguous blocks; every slot that holds no token is NaN.

    Block 0 is a finite "null" block that no sequence owns: block tables are padded with 0.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max(blocks_per_seq) + 1  # one column of padding
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    k_cache[0] = torch.randn(shape[1:], generator=gen).to(dtype)
    v_cache[0] = torch.randn(shape[1:], generator=gen).to(dtype)
    for i, (s, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids = [order.pop() for _ in range(nb)]
        block_tables[i, :nb] = torch.tensor(ids, dtype=torch.int32)
        slots = torch.tensor(ids).repeat_interleave(block_size)[:s] * block_size + (
            torch.arange(s) % block_size)
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            s, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            s, num_kv_heads, head_dim, generator=gen).to(dtype)
    num_tokens = sum(q_lens)
    query = torch.randn(num_tokens, num_kv_heads * queries_per_kv, head_dim, generator=gen)
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64, device=DEVICE),
        query_start_loc=query_start_loc.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE), block_size=block_size,
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_lens_host=list(q_lens), seq_lens_host=list(seq_lens),
    )
    return query.to(dtype).to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), meta


def run_attention(q_lens, seq_lens, dtype=torch.float32, num_splits=1, tile_n=None, **kw):
    query, k_cache, v_cache, meta = make_batch(q_lens, seq_lens, dtype=dtype, **kw)
    scale = query.shape[-1] ** -0.5
    out = torch.full_like(query, float("nan"))
    got = paged_attention_triton(query, k_cache, v_cache, meta, scale, out=out,
                                 num_splits=num_splits, tile_n=tile_n)
    assert got is out
    assert_close(out, paged_attention_ref(query, k_cache, v_cache, meta, scale), dtype)


def ragged_decodes(b):
    return [1] * 5, [1, b - 1, b, b + 1, 3 * b + 5]


def prompt_chunks(b):
    # Whole prompts, a chunk starting mid-block, a chunk starting exactly on a block boundary.
    return [5, b + 1, 7, 3], [5, b + 1, 7 + b + 2, 3 + 2 * b]


def mixed(b):
    return [1, 9, 1, 2 * b + 3, 1], [2 * b + 1, 9 + 4, b, 2 * b + 3, 1]


CASES = {"decodes": ragged_decodes, "chunks": prompt_chunks, "mixed": mixed}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_attention_matches_reference_fp32(case, block_size, gqa):
    q_lens, seq_lens = CASES[case](block_size)
    run_attention(q_lens, seq_lens, block_size=block_size, queries_per_kv=gqa,
                  num_kv_heads=1 if gqa == 8 else 2, tile_n=16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_attention_half_precision(dtype, num_splits):
    run_attention([1, 9, 1, 20], [33, 13, 16, 20], dtype=dtype, num_splits=num_splits)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_splits", [2, 5])
def test_attention_split_k_decodes(block_size, num_splits):
    # More splits than a short sequence has tiles: empty partitions must merge as nothing.
    q_lens, seq_lens = ragged_decodes(block_size)
    run_attention(q_lens, seq_lens, block_size=block_size, num_splits=num_splits, tile_n=16)


def test_attention_split_k_mixed_batch():
    # Split-K is chosen only for decode-only steps, but it stays correct for prompt chunks too.
    run_attention([1, 5, 20], [40, 5, 25], num_splits=3, tile_n=16)


@pytest.mark.parametrize("head_dim", [48, 128, 256])
def test_attention_head_dims(head_dim):
    run_attention([1, 6], [40, 20], head_dim=head_dim, queries_per_kv=2, num_kv_heads=1)


def test_attention_long_decode_default_tiles_with_split_k():
    run_attention([1, 1], [300, 77], num_splits=4, queries_per_kv=4, num_kv_heads=1)


def test_attention_rejects_mismatched_dtypes():
    query, k_cache, v_cache, meta = make_batch([1], [5])
    with pytest.raises(ValueError, match="dtype"):
        paged_attention_triton(query.half(), k_cache, v_cache, meta, 1.0)
    meta.block_size = 32
    with pytest.raises(ValueError, match="block_size"):
        paged_attention_triton(query, k_cache, v_cache, meta, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_scatters_and_skips_padding(dtype, block_size):
    num_blocks, num_kv_heads, head_dim = 5, 2, 32
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    slots = torch.tensor([3, -1, 4 * block_size + 1, 0, block_size - 1, -1], device=DEVICE)
    key = torch.randn(6, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    value = torch.randn(6, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_triton(key, value, k_cache, v_cache, slots)
    write_kv_ref(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache.isnan(), k_ref.isnan())  # padding rows wrote nothing
    assert torch.equal(k_cache.nan_to_num(0), k_ref.nan_to_num(0))
    assert torch.equal(v_cache.nan_to_num(0), v_ref.nan_to_num(0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(dtype):
    x = torch.randn(3, 7, 96, device=DEVICE).to(dtype)
    weight = (1 + torch.randn(96, device=DEVICE) * 0.1).to(dtype)
    out = torch.full_like(x, float("nan"))
    rms_norm_triton(x, weight, 1e-6, out=out)
    assert_close(out, rms_norm_ref(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_reference(dtype):
    x = torch.randn(9, 80, device=DEVICE).to(dtype)
    residual = torch.randn(9, 80, device=DEVICE).to(dtype)
    weight = torch.randn(80, device=DEVICE).to(dtype)
    out = torch.full_like(x, float("nan"))
    residual_out = torch.full_like(x, float("nan"))
    normed, new_residual = add_rms_norm_triton(x, residual, weight, 1e-5, out, residual_out)
    ref_normed, ref_residual = add_rms_norm_ref(x, residual, weight, 1e-5)
    assert normed is out and new_residual is residual_out
    assert_close(new_residual, ref_residual, dtype)
    assert_close(normed, ref_normed, dtype)


def test_rms_norm_non_contiguous_rows():
    x = torch.randn(6, 128, device=DEVICE)[:, :64]  # row stride 128
    weight = torch.randn(64, device=DEVICE)
    assert_close(rms_norm_triton(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_rotary_in_place_matches_reference(dtype, rotary_dim):
    positions = torch.tensor([0, 5, 63, 2, 17], device=DEVICE)
    cos_sin = torch.randn(64, rotary_dim, device=DEVICE)
    # q and k as views into one fused qkv projection (strided tokens), like a model produces.
    qkv = torch.randn(5, 6 + 2 + 2, 32, device=DEVICE).to(dtype)
    query, key = qkv[:, :6], qkv[:, 6:8]
    q_ref, k_ref = query.clone(), key.clone()
    apply_rotary_triton(positions, query, key, cos_sin)
    apply_rotary_ref(positions, q_ref, k_ref, cos_sin)
    assert_close(query, q_ref, dtype)
    assert_close(key, k_ref, dtype)


def test_backend_step_matches_torch_backend():
    """Prefill then decode through the backend interface: rotary, KV write, attention."""
    block_size, num_kv_heads, num_heads, head_dim = 16, 2, 4, 32
    backends = {"triton": TritonBackend(), "torch": TorchBackend()}
    caches = {name: (torch.zeros(6, block_size, num_kv_heads, head_dim, device=DEVICE),
                     torch.zeros(6, block_size, num_kv_heads, head_dim, device=DEVICE))
              for name in backends}
    cos_sin = torch.randn(64, head_dim, device=DEVICE)
    tables = torch.tensor([[4, 1], [2, 5]], dtype=torch.int32, device=DEVICE)
    steps = [([18, 3], [0, 0]), ([1, 1], [18, 3])]  # (query_lens, context lens)
    for q_lens, ctx in steps:
        seq_lens = [q + c for q, c in zip(q_lens, ctx)]
        positions = torch.cat([torch.arange(c, c + q) for q, c in zip(q_lens, ctx)]).to(DEVICE)
        slots = torch.cat([tables[i, positions_i // block_size].long() * block_size
                           + positions_i % block_size
                           for i, positions_i in enumerate(positions.split(q_lens))])
        qsl = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=DEVICE)
        q = torch.randn(sum(q_lens), num_heads, head_dim, device=DEVICE)
        k = torch.randn(sum(q_lens), num_kv_heads, head_dim, device=DEVICE)
        v = torch.randn(sum(q_lens), num_kv_heads, head_dim, device=DEVICE)
        outs = {}
        for name, backend in backends.items():
            meta = AttentionMetadata(slots, qsl, torch.tensor(seq_lens, dtype=torch.int32,
                                                              device=DEVICE), tables, block_size,
                                     max(q_lens), max(seq_lens), list(q_lens), seq_lens)
            backend.prepare(meta)
            qn, kn = q.clone(), k.clone()
            backend.rotary(positions, qn, kn, cos_sin)
            backend.write_kv(kn, v, *caches[name], slots)
            outs[name] = backend.attention(qn, *caches[name], meta, head_dim ** -0.5)
        assert_close(outs["triton"], outs["torch"], torch.float32)
    for name in backends:
        backends[name].copy_blocks([caches[name]], torch.tensor([4], device=DEVICE),
                                   torch.tensor([3], device=DEVICE))
    assert torch.equal(caches["triton"][0], caches["torch"][0])
    assert torch.equal(caches["triton"][0][3], caches["triton"][0][4])


def test_get_backend_honours_env(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert isinstance(get_backend("cpu"), TritonBackend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attention_auto_split_k_long_decode_gpu():
    # Few sequences, long context: the wrapper picks split-K by itself on a GPU.
    run_attention([1, 1], [4000, 2500], dtype=torch.bfloat16, num_splits=None,
                  num_kv_heads=2, queries_per_kv=4, head_dim=128)
