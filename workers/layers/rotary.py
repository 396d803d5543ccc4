"""Rotary position embedding (neox style): the cos/sin table and the in-place application.

Rope settings come from ``config.rope_parameters`` (transformers >= 5) or from the older
``rope_theta`` + ``rope_scaling`` pair; both are normalised by :func:`rope_parameters`.
"""
from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings as one flat dict with at least ``rope_type`` and ``rope_theta``."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        params = dict(params)
    else:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = getattr(hf_config, "partial_rotary_factor", None) or 1.0
    return params


def inverse_frequencies(rotary_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """``[rotary_dim // 2]`` float32 inverse frequencies for the configured rope type."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (float(params["rope_theta"]) ** exponents)  # [rotary_dim // 2]
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, params)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short ones kept, a ramp between."""
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context_len = float(params["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_cos_sin_cache(head_dim: int, max_positions: int, params: dict[str, Any],
                        device: torch.device) -> torch.Tensor:
    """``[max_positions, rotary_dim]`` float32: cos in the first half, sin in the second."""
    rotary_dim = int(head_dim * float(params["partial_rotary_factor"]))
    inv_freq = inverse_frequencies(rotary_dim, params).to(device)  # [rotary_dim // 2]
    positions = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)  # [max_positions, rotary_dim // 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RotaryEmbedding(torch.nn.Module):
    """Rotates q and k in place at their absolute positions."""

    def __init__(self, head_dim: int, max_positions: int, params: dict[str, Any], *, backend,
                 device: torch.device) -> None:
        super().__init__()
        self.backend = backend
        # Kept in float32 whatever the model dtype: bf16 angles lose whole radians at long range.
        cache = build_cos_sin_cache(head_dim, max_positions, params, device)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> None:
        # positions [num_tokens]; query [num_tokens, num_heads, head_dim];
        # key [num_tokens, num_kv_heads, head_dim]
        self.backend.rotary(positions, query, key, self.cos_sin_cache)
