"""Top-p filtering without a vocabulary sort on CPU fp32 (kernels/csrc/top_p_cpu.cpp); None
elsewhere, where the caller's sort-based version runs."""
from __future__ import annotations

import torch

from raylm.kernels.cpu_ops import load_extension


def top_p_filter_cpu(
    logits: torch.Tensor,  # [rows, vocab] float32
    top_p: torch.Tensor,  # [rows] float64 in (0, 1]
) -> torch.Tensor | None:  # [rows, vocab], the dropped tokens at -inf; None: not handled here
    if not (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(1) == 1 and logits.size(1) > 0):
        return None
    ext = load_extension()
    if ext is None:
        return None
    return ext.top_p_filter_cpu(logits, logits.softmax(dim=-1), top_p.to(torch.float64))
