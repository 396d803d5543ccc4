"""RMSNorm whose math lives in the attention backend (torch reference or Triton)."""
from __future__ import annotations

import torch

from raylm.workers.layers.parallel import default_weight_loader, make_param


class RMSNorm(torch.nn.Module):
    def __init__(self, hidden_size: int, eps: float, *, backend, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = make_param((hidden_size,), dtype, device, default_weight_loader)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``rms_norm(x)``; with a residual, ``(rms_norm(x + residual), x + residual)``."""
        if residual is None:
            return self.backend.rms_norm(x, self.weight, self.eps)
        return self.backend.add_rms_norm(x, residual, self.weight, self.eps)
