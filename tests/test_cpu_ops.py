"""The compiled CPU ops equal their torch references: paged attention on ragged, mixed, paged
batches; the few-row streaming linear."""
import itertools
import math
import os
import platform
import re
import sys

import pytest
import torch

from raylm.kernels.attention_cpu import paged_attention_cpu
from raylm.kernels.cpu_ops import load_extension
from raylm.kernels.linear import linear
from raylm.kernels.attention_ref import paged_attention_ref
from raylm.kernels.backend import CpuBackend
from raylm.kernels.kv_write_ref import write_kv_ref
from raylm.kernels.metadata import AttentionMetadata

pytestmark = pytest.mark.skipif(load_extension() is None, reason="no C++ toolchain to build it")


def _case(q_lens, s_lens, block_size, num_kv_heads, group, head_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for s in s_lens) + 7
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g)  # shuffled, non-contiguous blocks
    max_blocks = max(-(-s // block_size) for s in s_lens)
    tables = torch.zeros(len(s_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, s in enumerate(s_lens):
        n = -(-s // block_size)
        tables[i, :n] = perm[used : used + n]
        used += n
    num_tokens = sum(q_lens)
    query = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=g)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(num_tokens, dtype=torch.long),
        query_start_loc=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32),
        seq_lens=torch.tensor(s_lens, dtype=torch.int32), block_tables=tables,
        block_size=block_size, max_query_len=max(q_lens), max_seq_len=max(s_lens),
        query_lens_host=list(q_lens), seq_lens_host=list(s_lens))
    return query, k_cache, v_cache, meta


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,group", [(4, 1), (4, 2), (2, 4), (1, 8)])
@pytest.mark.parametrize("head_dim", [64, 40])  # the vector path; the scalar fallback
def test_mixed_batch_matches_reference(block_size, num_kv_heads, group, head_dim):
    B = block_size
    # decodes at 1, B-1, B, B+1 and several blocks; a full prompt; chunks starting mid-block
    # (context 3B-5 and 3B-3) and one starting on a block boundary (context B).
    q_lens = [1, 1, 1, 1, 1, 20, 7, B + 3, 2 * B]
    s_lens = [1, B - 1, B, B + 1, 5 * B + 3, 20, 3 * B + 2, 4 * B, 3 * B]
    query, k_cache, v_cache, meta = _case(q_lens, s_lens, B, num_kv_heads, group, head_dim)
    ref = paged_attention_ref(query, k_cache, v_cache, meta, scale=0.17)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale=0.17)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)  # fp32


@pytest.mark.parametrize("head_dim", [32, 80, 96, 128, 256])
def test_every_vector_head_size_matches_reference(head_dim):
    """Each head size has its own register blocking (rows of P.V per pass): prefill tiles of
    odd row counts and decodes, fp32 and bf16 caches."""
    q_lens, s_lens = [1, 13, 1, 21], [37, 13, 50, 40]
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-5)):
        query, k_cache, v_cache, meta = _case(q_lens, s_lens, 16, 2, 3, head_dim)
        k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
        ref = paged_attention_ref(query, k_cache.float(), v_cache.float(), meta, scale=0.11)
        out = paged_attention_cpu(query, k_cache, v_cache, meta, scale=0.11)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (2, 2), (2, 4), (1, 8)])
def test_16bit_cache_matches_reference(cache_dtype, num_kv_heads, group):
    q_lens, s_lens = [1, 1, 9, 13], [37, 16, 40, 13]
    query, k_cache, v_cache, meta = _case(q_lens, s_lens, 16, num_kv_heads, group, head_dim=64)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    ref = paged_attention_ref(query, k_cache, v_cache, meta, scale=0.2)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale=0.2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)  # same rounded K/V, fp32 math


@pytest.mark.parametrize("q_lens,s_lens", [([1], [9000]), ([5], [9003]), ([1, 1], [4100, 30])])
def test_long_sequences_split_over_key_blocks_match_reference(q_lens, s_lens):
    """Few (sequence, KV head) items and many keys: the kernel splits the keys over the cores
    and merges the partial softmaxes (a no-op split on one thread must still be exact)."""
    query, k_cache, v_cache, meta = _case(q_lens, s_lens, 16, 1, 8, head_dim=64)
    ref = paged_attention_ref(query, k_cache, v_cache, meta, scale=0.125)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale=0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_legacy_kernel_still_matches_reference():
    """RAYLM_ATTENTION_IMPL=legacy (A/B benchmarks) computes the same attention."""
    query, k_cache, v_cache, meta = _case([1, 1, 7], [40, 3, 30], 16, 2, 2, head_dim=64)
    ref = paged_attention_ref(query, k_cache, v_cache, meta, scale=0.125)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale=0.125, impl="legacy")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_strided_query_view():
    query, k_cache, v_cache, meta = _case([1, 9], [40, 9], 16, 2, 2, head_dim=64)
    wide = torch.randn(query.shape[0], query.shape[1] * 2, query.shape[2])
    wide[:, : query.shape[1]] = query
    view = wide[:, : query.shape[1]]  # non-contiguous rows, like q split from a fused qkv
    torch.testing.assert_close(paged_attention_cpu(view, k_cache, v_cache, meta, 0.125),
                               paged_attention_ref(query, k_cache, v_cache, meta, 0.125),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16, 27, 64])
@pytest.mark.parametrize("in_features", [96, 100, 1536])
@pytest.mark.parametrize("with_bias", [False, True])
def test_streaming_linear_matches_torch(rows, in_features, with_bias):
    """Every row count the kernel specialises, a width that is not a multiple of the vector
    (masked tail), a wide input (smaller row groups) and an output count that leaves a weight
    row outside the register tiles."""
    ext = load_extension()
    g = torch.Generator().manual_seed(rows)
    k, n = in_features, 203
    tol = dict(atol=1e-4 * (k / 96) ** 0.5, rtol=1e-5)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if with_bias else None
    torch.testing.assert_close(ext.linear_small_batch(x, w, b),
                               torch.nn.functional.linear(x, w, b), **tol)
    # A row view of a wider tensor (the fused qkv output) works as well.
    wide = torch.randn(rows, 2 * k, generator=g)[:, :k]
    torch.testing.assert_close(ext.linear_small_batch(wide, w, b),
                               torch.nn.functional.linear(wide, w, b), **tol)
    torch.testing.assert_close(linear(wide, w, b), torch.nn.functional.linear(wide, w, b), **tol)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 7, 130])
def test_kv_write_matches_reference(cache_dtype, num_tokens):
    """The compiled scatter writes what the torch reference writes: k/v as strided views of a
    fused qkv row, padding slots (-1) skipped, every cache dtype; the rest of the cache stays."""
    g = torch.Generator().manual_seed(num_tokens)
    blocks, block_size, kv_heads, head_dim = 20, 16, 2, 64
    qkv = torch.randn(num_tokens, (4 + 2 * kv_heads) * head_dim, generator=g)
    k = qkv[:, 4 * head_dim:(4 + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    v = qkv[:, (4 + kv_heads) * head_dim:].view(num_tokens, kv_heads, head_dim)
    slots = torch.randperm(blocks * block_size, generator=g)[:num_tokens]
    slots[::3] = -1
    caches = [torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(cache_dtype)
              for _ in range(2)]
    expected = [c.clone() for c in caches]
    write_kv_ref(k, v, *expected, slots)
    backend = CpuBackend()
    backend.write_kv(k, v, *caches, slots)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="slot out of range"):
        load_extension().write_kv_cpu(k, v, *caches, torch.full_like(slots, blocks * block_size))


def test_linear_plan_is_measured_per_shape_and_bucket():
    from raylm.kernels import linear_plan
    from raylm.kernels.linear import pack_weight

    weights = [torch.randn(256, 128), torch.randn(128, 384)]
    table = linear_plan.calibrate(weights, [pack_weight(weights[0]), None])
    assert set(table) == {(128, 256), (384, 128)}
    for choices in table.values():
        assert set(choices) == set(linear_plan.ROW_BUCKETS)
        assert set(choices.values()) <= {"stream", "packed", "blas"}
    # the streaming kernel only up to its row limit; packed only where packed weights were given
    assert all(table[shape][b] != "stream" for shape in table for b in linear_plan.ROW_BUCKETS
               if b > linear_plan.MAX_STREAM_ROWS)
    assert "packed" not in table[(384, 128)].values()
    assert linear_plan.packs(128, 256) == ("packed" in table[(128, 256)].values())
    # A call picks its nearest bucket's choice; beyond the largest bucket, the largest's.
    for rows in (1, 3, 6, 12, 24, 32, 300, 4000):
        bucket = min(linear_plan.ROW_BUCKETS,
                     key=lambda b: abs(math.log2(b) - math.log2(min(rows, 256))))
        assert linear_plan.choose(rows, 128, 256) == table[(128, 256)][bucket]
    assert linear_plan.choose(65, 128, 256) != "stream"  # past the kernel's row limit
    # an unmeasured shape: streaming at <= 8 rows, the GEMM above
    assert linear_plan.choose(4, 7, 9) == "stream" and linear_plan.choose(9, 7, 9) == "blas"


@pytest.mark.parametrize("rows", [1, 5, 64, 129, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_torch(rows, with_bias):
    """Row counts off oneDNN's kernel grid (5 -> 8, 129 -> 144, 300 -> 320 padded rows) come
    back with exactly their own rows."""
    from raylm.kernels.linear import pack_weight

    torch.manual_seed(rows)
    w = torch.randn(200, 96)
    bias = torch.randn(200) if with_bias else None
    x = torch.randn(rows, 2 * 96)[:, :96]  # a strided row view, as the layers pass
    got = load_extension().linear_packed(x, pack_weight(w), bias)
    assert got.shape == (rows, 200) and got.is_contiguous()
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-4)


def test_layers_run_what_the_plan_chose(monkeypatch):
    """A layer with a packed weight runs oneDNN where the plan says packed, the streaming kernel
    where it says stream, torch's GEMM otherwise, all equal to F.linear."""
    from raylm.kernels import linear, linear_plan

    w = torch.randn(64, 32)
    packed = linear.pack_weight(w)
    calls = []
    ext = load_extension()

    class Spy:
        def linear_small_batch(self, *a):
            calls.append("stream")
            return ext.linear_small_batch(*a)

        def linear_packed(self, *a):
            calls.append("packed")
            return ext.linear_packed(*a)

    monkeypatch.setattr(linear, "load_extension", lambda: Spy())
    for impl in ("stream", "packed", "blas"):
        monkeypatch.setattr(linear_plan, "choose", lambda *a, impl=impl: impl)
        x = torch.randn(4, 32)
        torch.testing.assert_close(linear.linear(x, w, None, packed), x @ w.T,
                                   rtol=1e-5, atol=1e-5)
    assert calls == ["stream", "packed"]
    linear.linear(torch.randn(4, 32), w)  # packed chosen but no packed weight: the GEMM
    assert calls == ["stream", "packed"]


def test_fused_norms_rotary_and_activation_match_references():
    from raylm.kernels.activation import silu_and_mul
    from raylm.kernels.backend import CpuBackend
    from raylm.kernels.norm_ref import add_rms_norm_ref, rms_norm_ref
    from raylm.kernels.rotary_ref import apply_rotary_ref

    g = torch.Generator().manual_seed(0)
    backend = CpuBackend()
    x, res = torch.randn(70, 96, generator=g), torch.randn(70, 96, generator=g)
    w = torch.randn(96, generator=g)
    torch.testing.assert_close(backend.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    ref_out, ref_res = add_rms_norm_ref(x, res, w, 1e-6)
    out, new_res = backend.add_rms_norm(x, res.clone(), w, 1e-6)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(new_res, ref_res)
    # Rotary on strided q/k views of a fused qkv row, partial rotary (rotary_dim < head_dim).
    qkv = torch.randn(70, 6 * 32, generator=g)
    q, k = qkv[:, :128].view(70, 4, 32), qkv[:, 128:192].view(70, 2, 32)
    cache = torch.randn(500, 16, generator=g)
    pos = torch.randint(0, 500, (70,), generator=g)
    q_ref, k_ref = q.clone(), k.clone()
    apply_rotary_ref(pos, q_ref, k_ref, cache)
    backend.rotary(pos, q, k, cache)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)
    y = torch.randn(70, 2 * 40, generator=g)
    gate, up = y.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(y), torch.nn.functional.silu(gate) * up)


def test_a_build_left_behind_by_a_killed_builder_does_not_block_loading(tmp_path):
    """A builder killed mid-build leaves torch's lock file and no completion marker; the next
    process must take over the build instead of waiting forever on that lock."""
    import shutil
    import subprocess
    import sys

    from raylm.kernels.cpu_ops import build_directory

    built = build_directory()
    stale = tmp_path / built.name
    shutil.copytree(built, stale)
    (stale / "build-complete").unlink()
    (stale / "lock").touch()  # what a dead builder leaves
    code = ("from raylm.kernels.cpu_ops import load_extension; import torch; "
            "ext = load_extension(); x = torch.randn(2, 8); w = torch.randn(4, 8); "
            "assert torch.allclose(ext.linear_small_batch(x, w, None), x @ w.T, atol=1e-5)")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=240)
    assert (stale / "build-complete").exists() and not (stale / "lock").exists()


def test_compiled_ops_let_other_python_threads_run():
    """A step thread inside a compiled op must not hold the GIL: the server's event loop (another
    Python thread) keeps answering meanwhile."""
    import threading
    import time

    ext = load_extension()
    w = torch.full((32768, 2048), 0.5)  # 256 MB: each call streams it once (several ms)
    x = torch.randn(4, 2048)
    stop = threading.Event()
    calls = []

    def step_thread():
        while not stop.is_set():
            start = time.perf_counter()
            ext.linear_small_batch(x, w, None)
            calls.append(time.perf_counter() - start)

    thread = threading.Thread(target=step_thread)
    thread.start()
    try:
        while len(calls) < 2:
            time.sleep(0.001)
        # the main thread's sleeps wake on time while the other thread is in the kernel
        gaps = []
        for _ in range(50):
            start = time.perf_counter()
            time.sleep(0.0005)
            gaps.append(time.perf_counter() - start)
    finally:
        stop.set()
        thread.join()
    kernel_s = sorted(calls)[len(calls) // 2]
    worst_gap = sorted(gaps)[-3]  # allow a couple of scheduler hiccups
    assert worst_gap < max(kernel_s / 2, 0.002), (worst_gap, kernel_s)


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


@pytest.mark.parametrize("rows,n", [(1, 1), (1, 15), (3, 16), (1, 32000), (200, 32000), (7, 1037)])
def test_argmax_rows_matches_torch_first_index_and_nan(rows, n):
    from raylm.kernels.row_pick import argmax_rows

    g = torch.Generator().manual_seed(rows * 100003 + n)
    x = torch.randn(rows, n, generator=g)
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    # ties: few distinct values, so every row's max repeats across lanes and the tail
    ties = torch.randint(0, 3, (rows, n), generator=g).float()
    assert torch.equal(argmax_rows(ties), ties.argmax(dim=-1))
    # a masked row (all -inf) picks index 0; a NaN wins at its first position, as in torch
    special = x.clone()
    special[0] = float("-inf")
    if rows > 1:
        special[-1, n // 2] = float("nan")
        special[-1, n - 1] = float("nan")
    assert torch.equal(argmax_rows(special), special.argmax(dim=-1))
    # a strided view of rows (logits of a larger buffer)
    wide = torch.randn(rows, n + 9, generator=g)[:, 3:n + 3]
    assert torch.equal(argmax_rows(wide), wide.argmax(dim=-1))
    # leading dims ([seqs, k + 1, vocab] in speculative verification), and a transposed view
    # that cannot be flattened without a copy (torch's own argmax then)
    cube = torch.randn(2, rows, n, generator=g)
    assert torch.equal(argmax_rows(cube), cube.argmax(dim=-1))
    swapped = cube.transpose(0, 1)
    assert torch.equal(argmax_rows(swapped), swapped.argmax(dim=-1))


def test_inverse_cdf_draws_match_the_reference_and_the_distribution():
    from raylm.kernels.row_pick import sample_rows, sample_rows_reference

    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(64, 3000, generator=g) * 2, dim=-1)
    probs[:, 7::11] = 0.0  # filtered tokens (top-k / top-p / min-p leave zeros)
    probs[3] = 0.0
    probs[3, 2999] = 5.0  # unnormalised, one entry (the last) left
    u = torch.rand(64, dtype=torch.float64, generator=g)
    u[0], u[1] = 0.0, 1.0 - 2 ** -53  # both ends of [0, 1)
    picked = sample_rows(probs, u)
    assert torch.equal(picked, sample_rows_reference(probs, u))
    assert (probs.gather(1, picked.unsqueeze(1)) > 0).all()
    assert picked[3] == 2999

    # one row drawn many times: the counts follow its probabilities (chi-square)
    row = torch.softmax(torch.randn(40, generator=g), dim=-1)
    row[5] = 0.0
    draws = 40_000
    counts = torch.bincount(sample_rows(row.expand(draws, 40).contiguous(),
                                        torch.rand(draws, dtype=torch.float64, generator=g)),
                            minlength=40)
    assert counts[5] == 0
    keep = row > 0
    expected = row[keep].double() / row[keep].sum() * draws
    stat = float(((counts[keep].double() - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))
    assert p_value > 1e-3, (stat, dof)

    # a row of NaNs (a broken model) gives an index, not a crash: its first NaN, as the race did
    broken = torch.full((2, 100), float("nan"))
    broken[1, :10] = 0.0
    assert sample_rows(broken, torch.zeros(2, dtype=torch.float64)).tolist() == [0, 10]
