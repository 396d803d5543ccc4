"""Gated activation of the Llama MLP."""
from __future__ import annotations

import torch

from raylm.kernels.activation import silu_and_mul


class SiluAndMul(torch.nn.Module):
    """silu(gate) * up, where the input is the fused ``[gate | up]`` projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
        return silu_and_mul(x)
