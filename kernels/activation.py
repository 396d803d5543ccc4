"""SiLU-and-mul of the gated MLP: fused on CPU fp32 (kernels/csrc), torch elsewhere."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raylm.kernels.cpu_ops import load_extension


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1:
        ext = load_extension()
        if ext is not None:
            return ext.silu_and_mul_cpu(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
