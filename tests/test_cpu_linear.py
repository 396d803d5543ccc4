"""The CPU linear layers: the few-row streaming kernel and oneDNN on packed weights equal
torch's linear, and the per-shape plan measured at start-up decides which one a layer runs."""
import math

import pytest
import torch

from raylm.kernels.cpu_ops import load_extension
from raylm.kernels.linear import linear

pytestmark = pytest.mark.skipif(load_extension() is None, reason="no C++ toolchain to build it")


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
