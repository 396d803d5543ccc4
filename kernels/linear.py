"""Linear layers' matmul on CPU fp32: the streaming few-row kernel or torch's GEMM, per shape.

At a few rows a step is a sweep over every weight; the library GEMM reaches only part of the
streaming-read bandwidth there, kernels/csrc/linear_cpu.cpp most of it. Where the crossover lies
depends on the shape and the machine, so kernels/linear_plan.py measures it when the model loads.
Weights are used as stored ([out, in], contiguous): nothing is re-packed per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raylm.kernels.cpu_ops import load_extension
from raylm.kernels.linear_plan import use_streaming


def linear(x: torch.Tensor,  # [num_tokens, in_features]
           weight: torch.Tensor,  # [out_features, in_features]
           bias: torch.Tensor | None = None) -> torch.Tensor:  # [num_tokens, out_features]
    if (x.dim() == 2 and not x.is_cuda and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.is_contiguous() and x.stride(-1) == 1
            and x.shape[0] > 0 and use_streaming(x.shape[0], weight.shape[1], weight.shape[0])):
        ext = load_extension()
        if ext is not None:
            return ext.linear_small_batch(x, weight, bias)
    return F.linear(x, weight, bias)
