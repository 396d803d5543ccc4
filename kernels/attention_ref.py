"""Paged attention over block tables for a mixed batch (torch reference and CPU path).

Prompt chunks (query_len > 1) attend causally to their context plus themselves; single-token
decodes are batched: one gather of every decode row's K/V and one masked SDPA call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raylm.kernels.metadata import AttentionMetadata


@dataclass
class TorchAttentionPlan:
    """Index tensors derived once per step and shared by all layers."""

    decode_rows: torch.Tensor | None  # [num_decodes] query rows that are single-token decodes
    decode_slots: torch.Tensor | None  # [num_decodes, max_decode_len] flat slots (0 where masked)
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_decode_len] bool, True = attend
    # (query row start, query_len, flat slots [seq_len], causal bool mask [query_len, seq_len] or None)
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]


def _slots_of(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    positions = torch.arange(length, device=block_table.device)
    return block_table[positions // block_size].long() * block_size + positions % block_size


def plan_attention_ref(meta: AttentionMetadata) -> TorchAttentionPlan:
    block_size = meta.block_size
    q_lens, s_lens = meta.query_lens_host, meta.seq_lens_host
    device = meta.block_tables.device
    decode_idx = [i for i, q in enumerate(q_lens) if q == 1]
    decode_rows = decode_slots = decode_mask = None
    if decode_idx:
        starts = meta.query_start_loc.tolist()
        rows = torch.tensor([starts[i] for i in decode_idx], device=device)
        lens = torch.tensor([s_lens[i] for i in decode_idx], device=device)  # [num_decodes]
        max_len = int(max(s_lens[i] for i in decode_idx))
        positions = torch.arange(max_len, device=device)  # [max_len]
        tables = meta.block_tables[rows.new_tensor(decode_idx)].long()  # [num_decodes, max_blocks]
        num_blocks_needed = (max_len + block_size - 1) // block_size
        tables = tables[:, :num_blocks_needed]
        decode_slots = (tables[:, positions // block_size] * block_size + positions % block_size)
        valid = positions[None, :] < lens[:, None]  # [num_decodes, max_len]
        decode_slots = torch.where(valid, decode_slots, torch.zeros_like(decode_slots))
        decode_mask = valid[:, None, None, :]
        decode_rows = rows
    prefills = []
    start = 0
    for i, (q_len, s_len) in enumerate(zip(q_lens, s_lens)):
        if q_len > 1:
            slots = _slots_of(meta.block_tables[i], s_len, block_size)
            ctx = s_len - q_len
            mask = None
            if ctx > 0:
                # Query j (absolute position ctx + j) sees keys 0 .. ctx + j.
                key_pos = torch.arange(s_len, device=device)
                q_pos = torch.arange(ctx, s_len, device=device)
                mask = key_pos[None, :] <= q_pos[:, None]
            prefills.append((start, q_len, slots, mask))
        start += q_len
    return TorchAttentionPlan(decode_rows, decode_slots, decode_mask, prefills)


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Attention of this step's queries over the paged cache (K/V of this step already written)."""
    plan = meta.plan if isinstance(meta.plan, TorchAttentionPlan) else plan_attention_ref(meta)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = query.shape[1]
    gqa = num_heads != num_kv_heads
    k_flat = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    v_flat = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    out = torch.empty_like(query)
    if plan.decode_rows is not None:
        num_decodes, max_len = plan.decode_slots.shape
        flat = plan.decode_slots.reshape(-1)
        shape = (num_decodes, max_len, num_kv_heads, head_dim)
        # A 16-bit cache under a wider model: attend in the query's dtype.
        k = k_flat.index_select(0, flat).to(query.dtype).view(shape).transpose(1, 2)
        v = v_flat.index_select(0, flat).to(query.dtype).view(shape).transpose(1, 2)
        q = query.index_select(0, plan.decode_rows).unsqueeze(2)  # [num_decodes, num_heads, 1, head_dim]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=plan.decode_mask, scale=scale, enable_gqa=gqa
        )  # [num_decodes, num_heads, 1, head_dim]
        out[plan.decode_rows] = o.squeeze(2)
    for start, q_len, slots, mask in plan.prefills:
        q = query[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, num_heads, q_len, D]
        k = k_flat.index_select(0, slots).to(query.dtype).transpose(0, 1).unsqueeze(0)
        v = v_flat.index_select(0, slots).to(query.dtype).transpose(0, 1).unsqueeze(0)
        # k, v: [1, num_kv_heads, seq_len, head_dim]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
        )
        out[start : start + q_len] = o.squeeze(0).transpose(0, 1)
    return out
