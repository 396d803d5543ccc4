"""Which matmul a CPU fp32 linear layer runs: the streaming few-row kernel, oneDNN's GEMM on
weights packed once at load, or torch's BLAS GEMM.

Measured, not guessed: when a model loads, :func:`calibrate` times the candidates on each of its
weight shapes at a few row counts (``ROW_BUCKETS``) and keeps the fastest per (shape, bucket). A
call with ``rows`` rows picks the entry of the nearest bucket (log scale), above the largest
bucket that bucket's; an unmeasured shape gets the streaming kernel at <= 8 rows and the BLAS
GEMM above (the rule before calibration). The table is a property of this machine and thread
count, so it is cached for the process and logged once per new shape set.

The candidates, as measured on the 2-core AMD EPYC dev VM (bench model shapes, ms per call):
- ``stream`` (kernels/csrc/linear_cpu.cpp, <= 64 rows): reads each weight row once for all rows;
  the fastest at 1-2 rows, where a step is a sweep over the weights.
- ``packed`` (oneDNN's ``mkldnn::_linear_pointwise`` on a weight reordered once by
  ``_reorder_linear_weight``): torch's GEMM re-packs the weight on every call, which costs as
  much as the product itself at decode row counts. A [200, 512] x [512, 32000] LM head took 30 ms
  packed vs 44 ms, a [200, 512] x [512, 3072] gate/up 2.9 vs 4.9 ms. It costs a second copy of
  each weight whose shape uses it.
- ``blas`` (``F.linear``): kept where it measures fastest, and where oneDNN is not built in.

``RAYLM_LINEAR_IMPL`` (read here only) overrides for A/B runs: ``auto`` (the measured table,
default), ``stream8`` (the fixed rule: streaming at <= 8 rows, BLAS above, nothing packed),
``blas`` (always torch's GEMM, nothing packed).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IMPL_ENV = "RAYLM_LINEAR_IMPL"
IMPLS = ("auto", "stream8", "blas")
STREAM, PACKED, BLAS = "stream", "packed", "blas"
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 256)
MAX_STREAM_ROWS = 64  # what the compiled kernel accepts
LEGACY_STREAM_ROWS = 8
_REPEATS = 7

# (in_features, out_features, torch threads) -> the choice per row count 0..ROW_BUCKETS[-1]
_TABLE: dict[tuple[int, int, int], tuple[str, ...]] = {}


def linear_impl() -> str:
    impl = os.environ.get(IMPL_ENV, "").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"{IMPL_ENV} must be one of {IMPLS}, got {impl!r}")
    return impl


_IMPL = linear_impl()


def choose(rows: int, in_features: int, out_features: int) -> str:
    """The matmul for a [rows, in] x [out, in]^T fp32 CPU product: STREAM, PACKED or BLAS
    (PACKED only where the layer has packed weights: :func:`packs`)."""
    if _IMPL == "blas":
        return BLAS
    if _IMPL == "stream8":
        return STREAM if rows <= LEGACY_STREAM_ROWS else BLAS
    choices = _TABLE.get((in_features, out_features, torch.get_num_threads()))
    if choices is None:
        return STREAM if rows <= LEGACY_STREAM_ROWS else BLAS
    return choices[min(rows, len(choices) - 1)]


def packs(in_features: int, out_features: int) -> bool:
    """Whether the plan uses packed weights for this shape at some row count."""
    choices = _TABLE.get((in_features, out_features, torch.get_num_threads()))
    return choices is not None and PACKED in choices


def measured(in_features: int, out_features: int) -> bool:
    return (in_features, out_features, torch.get_num_threads()) in _TABLE


def _nearest_bucket(rows: int) -> int:
    return min(ROW_BUCKETS, key=lambda b: abs(math.log2(b) - math.log2(rows)))


def _median_times(candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median time of each candidate over rounds that rotate their order. Each call is a sweep
    over the model's own weights of one shape (as a step does, so the weights come from where a
    step finds them); the median shrugs off bursts of load from other processes that a best-of
    time would not, and the rotation spreads drift over all candidates."""
    names = list(candidates)
    for name in names:  # warm-up
        candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(_REPEATS):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


@torch.inference_mode()
def calibrate(weights: Sequence[torch.Tensor], packed: Sequence[torch.Tensor | None] | None = None,
              ) -> dict[tuple[int, int], dict[int, str]]:
    """Measure the choice for every new CPU fp32 weight shape [out, in], timing the given weights
    themselves (and ``packed[i]``, weight i packed by oneDNN, where not None); returns the table
    of the shapes given ({(in, out): {bucket: STREAM | PACKED | BLAS}}), logged once when new."""
    from raylm.kernels.cpu_ops import load_extension

    ext = load_extension()
    threads = torch.get_num_threads()
    packed = list(packed) if packed is not None else [None] * len(weights)
    by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
    for w, p in zip(weights, packed):
        if (w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2
                and w.is_contiguous()):
            by_shape.setdefault((w.shape[1], w.shape[0]), []).append((w.detach(), p))
    if ext is None or _IMPL != "auto":
        return {}
    measured_times: dict[tuple[int, int], dict[int, dict[str, float]]] = {}
    g = torch.Generator().manual_seed(0)
    for (k, n), pairs in sorted(by_shape.items()):
        if (k, n, threads) in _TABLE:
            continue
        per_bucket = {}
        for b in ROW_BUCKETS:
            x = torch.randn(b, k, generator=g)  # [b, in]
            candidates = {BLAS: lambda: [F.linear(x, w) for w, _ in pairs]}
            if b <= MAX_STREAM_ROWS:
                candidates[STREAM] = lambda: [ext.linear_small_batch(x, w, None) for w, _ in pairs]
            if all(p is not None for _, p in pairs):
                candidates[PACKED] = lambda: [ext.linear_packed(x, p, None) for _, p in pairs]
            per_bucket[b] = _median_times(candidates)
        measured_times[(k, n)] = per_bucket
        best = {b: min(t, key=t.get) for b, t in per_bucket.items()}
        best_gemm = {b: min((name for name in t if name != STREAM), key=t.get)
                     for b, t in per_bucket.items()}  # above the streaming kernel's row limit
        _TABLE[(k, n, threads)] = (BLAS,) + tuple(
            (best if r <= MAX_STREAM_ROWS else best_gemm)[_nearest_bucket(r)]
            for r in range(1, ROW_BUCKETS[-1] + 1))
    if measured_times:
        lines = [f"  in={k:6d} out={n:6d}: " + " ".join(_describe(b, t) for b, t in buckets.items())
                 for (k, n), buckets in measured_times.items()]
        logger.info("linear plan (%d threads; per row bucket: the choice, S = streaming kernel, "
                    "P = oneDNN on packed weights, B = BLAS GEMM, and the others' time relative "
                    "to it):\n%s", threads, "\n".join(lines))
    return {(k, n): {b: _TABLE[(k, n, threads)][b] for b in ROW_BUCKETS} for k, n in by_shape}


def _describe(bucket: int, times: dict[str, float]) -> str:
    best = min(times, key=times.get)
    others = " ".join(f"{name[0].upper()}{t / times[best]:.2f}" for name, t in times.items()
                      if name != best)
    return f"{bucket}:{best[0].upper()}({others})"
