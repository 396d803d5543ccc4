"""Rotary position embedding, neox style (rotate halves), applied in place (torch reference)."""
from __future__ import annotations

import torch


def apply_rotary_ref(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim]: cos in [:rotary_dim/2], sin after
) -> None:
    rotary_dim = cos_sin_cache.shape[-1]
    cos_sin = cos_sin_cache.index_select(0, positions)  # [num_tokens, rotary_dim]
    cos, sin = cos_sin.chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2] each
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    for x in (query, key):
        rot = x[..., :rotary_dim]
        x1, x2 = rot.chunk(2, dim=-1)
        x1f, x2f = x1.float(), x2.float()
        o1 = x1f * cos - x2f * sin
        o2 = x2f * cos + x1f * sin
        rot.copy_(torch.cat((o1, o2), dim=-1).to(x.dtype))
