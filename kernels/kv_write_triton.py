"""KV write in Triton: scatter this step's keys/values into the paged cache by ``slot_mapping``.

Same semantics as :func:`raylm.kernels.kv_write_ref.write_kv_ref`: token i goes to flat slot
``slot_mapping[i]`` (block ``slot // block_size``, offset ``slot % block_size``); slot -1 is
padding and is skipped, so CUDA-graph padded batches never touch the cache.
"""
from __future__ import annotations

import torch

from raylm.kernels import triton_utils  # noqa: F401  (sets TRITON_INTERPRET before @triton.jit)
from raylm.kernels.triton_utils import (
    SUPPORTED_DTYPES, check_same_device, check_tensor, next_power_of_2)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # int64 [num_tokens]
    stride_key_tok, stride_key_head,
    stride_value_tok, stride_value_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(key_ptr + token * stride_key_tok + heads[:, None] * stride_key_head
                + dims[None, :], mask=mask)  # [HEADS_PAD, HEAD_DIM_PAD]
    v = tl.load(value_ptr + token * stride_value_tok + heads[:, None] * stride_value_head
                + dims[None, :], mask=mask)
    tl.store(k_cache_ptr + block * stride_k_block + offset * stride_k_slot
             + heads[:, None] * stride_k_head + dims[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_v_block + offset * stride_v_slot
             + heads[:, None] * stride_v_head + dims[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    check_tensor("key", key, 3, SUPPORTED_DTYPES)
    check_tensor("value", value, 3, SUPPORTED_DTYPES)
    check_tensor("k_cache", k_cache, 4, SUPPORTED_DTYPES)
    check_tensor("v_cache", v_cache, 4, SUPPORTED_DTYPES)
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int64,), contiguous_last=False)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} differ")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_tokens = slot_mapping.shape[0]
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != (num_tokens, num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [{num_tokens}, {num_kv_heads}, {head_dim}], "
                             f"got {tuple(t.shape)}")
    if slot_mapping.stride(0) != 1 and num_tokens > 1:
        slot_mapping = slot_mapping.contiguous()
    check_same_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache,
                      slot_mapping=slot_mapping)
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=next_power_of_2(head_dim), BLOCK_SIZE=block_size,
    )
