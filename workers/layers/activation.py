"""Gated activation of the Llama MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SiluAndMul(torch.nn.Module):
    """silu(gate) * up, where the input is the fused ``[gate | up]`` projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
