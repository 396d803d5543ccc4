"""Argmax over the last dim (greedy picks, the exponential race, speculative verification):
vectorised on CPU fp32 (kernels/csrc/argmax_cpu.cpp), torch elsewhere. Same result as
``x.argmax(dim=-1)``: the first maximal index, or a row's first NaN."""
from __future__ import annotations

import torch

from raylm.kernels.cpu_ops import load_extension


def argmax_rows(x: torch.Tensor) -> torch.Tensor:  # [..., n] -> [...] int64
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 1 and x.size(-1) > 0:
        ext = load_extension()
        if ext is not None:
            try:
                rows = x.view(-1, x.size(-1))  # [prod(leading), n], no copy
            except RuntimeError:  # leading dims that do not flatten without a copy
                rows = None
            if rows is not None and rows.stride(1) == 1:
                return ext.argmax_rows_cpu(rows).view(x.shape[:-1])
    return x.argmax(dim=-1)
