"""Triton implementation of the backend interface (:class:`raylm.kernels.backend.TorchBackend`).

Used on CUDA tensors, or anywhere with ``RAYLM_ATTENTION_BACKEND=triton`` (on CPU the kernels run
in the Triton interpreter, slowly but with the same code, which is how they are tested).
"""
from __future__ import annotations

import torch

from raylm.kernels.attention_triton import paged_attention_triton
from raylm.kernels.backend import TorchBackend
from raylm.kernels.kv_write_triton import write_kv_triton
from raylm.kernels.metadata import AttentionMetadata
from raylm.kernels.norm_triton import add_rms_norm_triton, rms_norm_triton
from raylm.kernels.rotary_triton import apply_rotary_triton


class TritonBackend(TorchBackend):
    """Same methods and semantics as TorchBackend; every op is one (or two) kernel launches
    (copy_blocks, a plain indexed copy, is inherited)."""

    name = "triton"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Nothing to precompute: the attention kernel derives everything from ``meta`` tensors."""
        meta.plan = None

    def write_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    ) -> None:
        write_kv_triton(key, value, k_cache, v_cache, slot_mapping)

    def attention(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        return paged_attention_triton(query, k_cache, v_cache, meta, scale)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm_triton(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm_triton(x, residual, weight, eps)

    def rotary(
        self,
        positions: torch.Tensor,  # [num_tokens] int64
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim]
    ) -> None:
        apply_rotary_triton(positions, query, key, cos_sin_cache)
