"""Which matmul a CPU fp32 linear layer runs: the streaming few-row kernel or torch's BLAS GEMM.

Measured, not guessed: when a model loads, :func:`calibrate` times both on each of its weight
shapes at a few row counts (``ROW_BUCKETS``) and keeps the faster one per (shape, bucket). A call
with ``rows`` rows picks the entry of the nearest bucket (log scale); above the largest bucket or
for an unmeasured shape it uses the GEMM (streaming only at <= 8 rows, as before calibration).
The table is a property of this machine and thread count, so it is cached for the process and
logged once per new shape set.

``RAYLM_LINEAR_IMPL`` (read here only) overrides for A/B runs: ``auto`` (the measured table,
default), ``stream8`` (the previous fixed rule: streaming at <= 8 rows), ``blas`` (always the GEMM).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IMPL_ENV = "RAYLM_LINEAR_IMPL"
IMPLS = ("auto", "stream8", "blas")
ROW_BUCKETS = (1, 2, 4, 8, 16, 32)
MAX_STREAM_ROWS = 64  # what the compiled kernel accepts
LEGACY_STREAM_ROWS = 8
_REPEATS = 5

# (in_features, out_features, torch threads) -> per row count 0..ROW_BUCKETS[-1]: stream?
_TABLE: dict[tuple[int, int, int], tuple[bool, ...]] = {}


def linear_impl() -> str:
    impl = os.environ.get(IMPL_ENV, "").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"{IMPL_ENV} must be one of {IMPLS}, got {impl!r}")
    return impl


_IMPL = linear_impl()


def use_streaming(rows: int, in_features: int, out_features: int) -> bool:
    """Whether a [rows, in] x [out, in]^T fp32 CPU matmul should use the streaming kernel."""
    if _IMPL == "blas" or rows > MAX_STREAM_ROWS:
        return False
    if _IMPL == "stream8":
        return rows <= LEGACY_STREAM_ROWS
    choices = _TABLE.get((in_features, out_features, torch.get_num_threads()))
    if choices is None:
        return rows <= LEGACY_STREAM_ROWS
    return rows < len(choices) and choices[rows]


def _nearest_bucket(rows: int) -> int:
    return min(ROW_BUCKETS, key=lambda b: abs(math.log2(b) - math.log2(rows)))


def _time_pair(x: torch.Tensor, w: torch.Tensor, ext) -> tuple[float, float]:
    """Best-of wall times (streaming, GEMM), interleaved so both see the same machine load."""
    best_s = best_b = float("inf")
    ext.linear_small_batch(x, w, None)
    F.linear(x, w)
    for _ in range(_REPEATS):
        t0 = time.perf_counter()
        ext.linear_small_batch(x, w, None)
        t1 = time.perf_counter()
        F.linear(x, w)
        t2 = time.perf_counter()
        best_s, best_b = min(best_s, t1 - t0), min(best_b, t2 - t1)
    return best_s, best_b


@torch.inference_mode()
def calibrate(weights: Iterable[torch.Tensor]) -> dict[tuple[int, int], dict[int, str]]:
    """Measure the choice for every new CPU fp32 weight shape [out, in]; returns the table of
    the shapes given ({(in, out): {bucket: "stream" | "blas"}}), logged once when new."""
    from raylm.kernels.cpu_ops import load_extension

    ext = load_extension()
    threads = torch.get_num_threads()
    shapes = sorted({(w.shape[1], w.shape[0]) for w in weights
                     if w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2
                     and w.is_contiguous()})
    if ext is None or _IMPL != "auto":
        return {}
    new = [s for s in shapes if (*s, threads) not in _TABLE]
    timings: dict[tuple[int, int], dict[int, tuple[float, float]]] = {}
    g = torch.Generator().manual_seed(0)
    for k, n in new:
        w = torch.randn(n, k, generator=g)
        timings[(k, n)] = {b: _time_pair(torch.randn(b, k, generator=g), w, ext)
                           for b in ROW_BUCKETS}
        stream = {b: s < blas for b, (s, blas) in timings[(k, n)].items()}
        _TABLE[(k, n, threads)] = (False,) + tuple(stream[_nearest_bucket(r)]
                                                   for r in range(1, ROW_BUCKETS[-1] + 1))
    if new:
        lines = [f"  in={k:6d} out={n:6d}: " + " ".join(
            f"{b}:{'S' if s < blas else 'B'}({blas / s:.2f}x)" for b, (s, blas) in t.items())
            for (k, n), t in timings.items()]
        logger.info("linear plan (%d threads; S = streaming kernel, B = BLAS GEMM, (BLAS time / "
                    "streaming time)):\n%s", threads, "\n".join(lines))
    return {(k, n): {b: "stream" if _TABLE[(k, n, threads)][b] else "blas" for b in ROW_BUCKETS}
            for k, n in shapes}
