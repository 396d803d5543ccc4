"""Rotary position embedding in Triton, neox style (rotate halves), in place on query and key.

Same semantics as :func:`raylm.kernels.rotary_ref.apply_rotary_ref`: ``cos_sin_cache`` is
``[max_positions, rotary_dim]`` with cos in the first half and sin in the second; only the first
``rotary_dim`` features of each head rotate (partial rotary); the math runs in fp32.
"""
from __future__ import annotations

import torch

from raylm.kernels import triton_utils  # noqa: F401  (sets TRITON_INTERPRET before @triton.jit)
from raylm.kernels.triton_utils import (
    SUPPORTED_DTYPES, check_same_device, check_tensor, next_power_of_2)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _rotate_heads(x_ptr, stride_head, cos, sin, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads < NUM_HEADS)[:, None] & (dims < HALF)[None, :]
    first = x_ptr + heads[:, None] * stride_head + dims[None, :]  # [HEADS_PAD, HALF_PAD]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(first, (x1f * cos[None, :] - x2f * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(first + HALF, (x2f * cos[None, :] + x1f * sin[None, :]).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,  # int64 [num_tokens]
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_ptr,  # [max_positions, rotary_dim]
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cs,
    NUM_HEADS: tl.constexpr,
    NUM_HEADS_PAD: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    NUM_KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + dims, mask=dims < HALF, other=0.0)
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)
    _rotate_heads(q_ptr + token * stride_q_tok, stride_q_head, cos, sin,
                  NUM_HEADS, NUM_HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr + token * stride_k_tok, stride_k_head, cos, sin,
                  NUM_KV_HEADS, NUM_KV_HEADS_PAD, HALF, HALF_PAD)


def apply_rotary_triton(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim]
) -> None:
    check_tensor("positions", positions, 1, (torch.int64, torch.int32), contiguous_last=False)
    check_tensor("query", query, 3, SUPPORTED_DTYPES)
    check_tensor("key", key, 3, SUPPORTED_DTYPES)
    check_tensor("cos_sin_cache", cos_sin_cache, 2, SUPPORTED_DTYPES)
    num_tokens = positions.shape[0]
    rotary_dim = cos_sin_cache.shape[1]
    if query.shape[0] != num_tokens or key.shape[0] != num_tokens:
        raise ValueError(f"query/key must have {num_tokens} tokens (positions), got "
                         f"{tuple(query.shape)} and {tuple(key.shape)}")
    if rotary_dim % 2 or rotary_dim > query.shape[2] or query.shape[2] != key.shape[2]:
        raise ValueError(f"cos_sin_cache rotary_dim {rotary_dim} must be even and <= head_dim "
                         f"(query {tuple(query.shape)}, key {tuple(key.shape)})")
    if positions.stride(0) != 1 and num_tokens > 1:
        positions = positions.contiguous()
    check_same_device(positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache)
    if num_tokens == 0:
        return
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, query, key, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, NUM_HEADS_PAD=next_power_of_2(num_heads),
        NUM_KV_HEADS=num_kv_heads, NUM_KV_HEADS_PAD=next_power_of_2(num_kv_heads),
        HALF=half, HALF_PAD=next_power_of_2(half),
    )
