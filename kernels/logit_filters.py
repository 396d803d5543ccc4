"""Logit filters on CPU fp32 without sorting or selecting over the vocabulary
(kernels/csrc/top_p_cpu.cpp, logit_mask_cpu.cpp). Each returns None where it does not apply
(GPU, 16-bit logits, no compiler), and the caller's torch version runs."""
from __future__ import annotations

import torch

from raylm.kernels.cpu_ops import load_extension


def _extension_for(*rows: torch.Tensor):
    """The compiled ops if every tensor is CPU fp32 [rows, n] with a contiguous last dim."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2
               and t.stride(1) == 1 and t.size(1) > 0 for t in rows):
        return None
    return load_extension()


def top_p_filter_cpu(
    logits: torch.Tensor,  # [rows, vocab] float32
    top_p: torch.Tensor,  # [rows] float64 in (0, 1]
) -> torch.Tensor | None:  # [rows, vocab], the dropped tokens at -inf
    ext = _extension_for(logits)
    if ext is None:
        return None
    return ext.top_p_filter_cpu(logits, logits.softmax(dim=-1), top_p.to(torch.float64))


def top_k_filter_cpu(
    logits: torch.Tensor,  # [rows, vocab] float32
    top_k: torch.Tensor,  # [rows] int64, <= 0 = off
) -> torch.Tensor | None:  # [rows, vocab], tokens below the row's k-th largest logit at -inf
    ext = _extension_for(logits)
    if ext is None:
        return None
    return ext.top_k_filter_cpu(logits, top_k.to(torch.int64))


def mask_below_cpu(
    values: torch.Tensor,  # [rows, vocab] float32
    threshold: torch.Tensor,  # [rows] float32
    logits: torch.Tensor,  # [rows, vocab] float32
) -> torch.Tensor | None:  # logits, at -inf where values < the row's threshold
    ext = _extension_for(values, logits)
    if ext is None:
        return None
    return ext.mask_below_cpu(values, threshold.to(torch.float32), logits)
