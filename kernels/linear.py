"""Linear layers' matmul on CPU fp32: the streaming few-row kernel, oneDNN's GEMM on weights
packed once at load, or torch's GEMM, per shape and row count (kernels/linear_plan.py measures
which when the model loads).

At a few rows a step is a sweep over every weight; the library GEMM reaches only part of the
streaming-read bandwidth there, kernels/csrc/linear_cpu.cpp most of it. At more rows torch's GEMM
re-packs the weight on every call; oneDNN on a weight packed once skips that. Weights are never
re-packed per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raylm.kernels import linear_plan
from raylm.kernels.cpu_ops import load_extension


def linear(x: torch.Tensor,  # [num_tokens, in_features]
           weight: torch.Tensor,  # [out_features, in_features]
           bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None,  # weight packed by pack_weight(), or None
           ) -> torch.Tensor:  # [num_tokens, out_features]
    if (x.dim() == 2 and not x.is_cuda and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.is_contiguous() and x.stride(-1) == 1
            and x.shape[0] > 0):
        impl = linear_plan.choose(x.shape[0], weight.shape[1], weight.shape[0])
        if impl != linear_plan.BLAS:
            ext = load_extension()
            if ext is not None and impl == linear_plan.STREAM:
                return ext.linear_small_batch(x, weight, bias)
            if ext is not None and packed is not None:
                return ext.linear_packed(x, packed, bias)
    return F.linear(x, weight, bias)


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.is_contiguous() and torch.backends.mkldnn.is_available()
            and load_extension() is not None)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:  # [out, in] -> oneDNN's blocked layout
    """A copy of ``weight`` in the layout oneDNN's GEMM reads directly (an opaque mkldnn tensor:
    only ``ext.linear_packed`` uses it)."""
    with torch.inference_mode():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
