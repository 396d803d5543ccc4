"""One index per row of a [rows, vocab] tensor: the argmax (greedy picks, the exponential race,
speculative verification) and an inverse-CDF draw (random sampling on CPU). Vectorised C++ on
CPU fp32 (kernels/csrc/argmax_cpu.cpp, sample_cpu.cpp), torch elsewhere."""
from __future__ import annotations

import torch

from raylm.kernels.cpu_ops import load_extension


def _cpu_ext(x: torch.Tensor):
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 1 and x.size(-1) > 0:
        return load_extension()
    return None


def argmax_rows(x: torch.Tensor) -> torch.Tensor:  # [..., n] -> [...] int64
    """``x.argmax(dim=-1)``: the first maximal index, or a row's first NaN."""
    ext = _cpu_ext(x)
    if ext is not None:
        try:
            rows = x.view(-1, x.size(-1))  # [prod(leading), n], no copy
        except RuntimeError:  # leading dims that do not flatten without a copy
            rows = None
        if rows is not None and rows.stride(1) == 1:
            return ext.argmax_rows_cpu(rows).view(x.shape[:-1])
    return x.argmax(dim=-1)


def sample_rows(
    probs: torch.Tensor,  # [rows, n] float32, non-negative, each row summing to > 0
    uniforms: torch.Tensor,  # [rows] float64 in [0, 1)
) -> torch.Tensor:  # [rows] int64
    """Row r's first index i with probs[r, :i + 1].sum() > uniforms[r] * probs[r].sum(): a draw
    from each row's distribution (unnormalised is fine); zero-probability entries never come."""
    ext = _cpu_ext(probs)
    if ext is not None and probs.dim() == 2 and probs.stride(1) == 1:
        return ext.sample_rows_cpu(probs, uniforms.to(torch.float64))
    return sample_rows_reference(probs, uniforms)


def sample_rows_reference(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    cdf = probs.double().cumsum(dim=-1)  # [rows, n]
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1)  # [rows, 1]
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)  # first cdf > target
    # rounding past the end: the last entry with probability
    last = probs.size(1) - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(picked, last)
