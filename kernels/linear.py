"""Linear layers' matmul: few-row CPU fp32 steps use a streaming kernel, the rest torch.

At batch 1..8 a decode step is a sweep over every weight; the library GEMM reaches about half
of the streaming-read bandwidth there, kernels/csrc/linear_cpu.cpp most of it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raylm.kernels.cpu_ops import load_extension

MAX_STREAMING_ROWS = 8


def linear(x: torch.Tensor,  # [num_tokens, in_features]
           weight: torch.Tensor,  # [out_features, in_features]
           bias: torch.Tensor | None = None) -> torch.Tensor:  # [num_tokens, out_features]
    if (x.shape[0] <= MAX_STREAMING_ROWS and x.dim() == 2 and not x.is_cuda
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.is_contiguous() and x.stride(-1) == 1 and x.shape[0] > 0):
        ext = load_extension()
        if ext is not None:
            return ext.linear_small_batch(x, weight, bias)
    return F.linear(x, weight, bias)
