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
_REPEATS = 9

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


def _ratio(x: torch.Tensor, weights: list[torch.Tensor], ext) -> float:
    """Median over paired runs of GEMM time / streaming time, each run a sweep over the model's
    own weights of this shape (as a step does, so the weights come from where a step finds
    them). Pairs alternate their order; the median of per-pair ratios shrugs off bursts of load
    from other processes that a best-of time would not."""
    def sweep(fn) -> float:
        t0 = time.perf_counter()
        for w in weights:
            fn(x, w)
        return time.perf_counter() - t0

    def stream(a, w):
        return ext.linear_small_batch(a, w, None)

    sweep(stream), sweep(F.linear)
    ratios = []
    for i in range(_REPEATS):
        if i % 2:
            s, b = sweep(stream), sweep(F.linear)
        else:
            b, s = sweep(F.linear), sweep(stream)
        ratios.append(b / s)
    return sorted(ratios)[len(ratios) // 2]


@torch.inference_mode()
def calibrate(weights: Iterable[torch.Tensor]) -> dict[tuple[int, int], dict[int, str]]:
    """Measure the choice for every new CPU fp32 weight shape [out, in] (timing the given
    weights themselves); returns the table of the shapes given ({(in, out): {bucket: "stream" |
    "blas"}}), logged once when new."""
    from raylm.kernels.cpu_ops import load_extension

    ext = load_extension()
    threads = torch.get_num_threads()
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for w in weights:
        if (w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2
                and w.is_contiguous()):
            by_shape.setdefault((w.shape[1], w.shape[0]), []).append(w.detach())
    if ext is None or _IMPL != "auto":
        return {}
    ratios: dict[tuple[int, int], dict[int, float]] = {}
    g = torch.Generator().manual_seed(0)
    for (k, n), ws in sorted(by_shape.items()):
        if (k, n, threads) in _TABLE:
            continue
        ratios[(k, n)] = {b: _ratio(torch.randn(b, k, generator=g), ws, ext) for b in ROW_BUCKETS}
        stream = {b: r > 1.0 for b, r in ratios[(k, n)].items()}
        _TABLE[(k, n, threads)] = (False,) + tuple(stream[_nearest_bucket(r)]
                                                   for r in range(1, ROW_BUCKETS[-1] + 1))
    if ratios:
        lines = [f"  in={k:6d} out={n:6d}: " + " ".join(
            f"{b}:{'S' if r > 1.0 else 'B'}({r:.2f}x)" for b, r in t.items())
            for (k, n), t in ratios.items()]
        logger.info("linear plan (%d threads; per row bucket: S = streaming kernel, B = BLAS "
                    "GEMM, (GEMM time / streaming time)):\n%s", threads, "\n".join(lines))
    return {(k, n): {b: "stream" if _TABLE[(k, n, threads)][b] else "blas" for b in ROW_BUCKETS}
            for k, n in by_shape}
