"""Per-step attention metadata shared by every attention backend (DESIGN.md section 4).

Built once per step by the model runner, passed explicitly to every layer (no globals).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """The paged-KV layout of one step.

    Tokens of all sequences are packed back to back: sequence i owns query rows
    ``query_start_loc[i] : query_start_loc[i + 1]``; those rows are the *last* query_len tokens
    of its ``seq_lens[i]`` cached tokens (context = seq_lens[i] - query_len tokens were computed
    in earlier steps). Token t of a sequence lives at flat slot
    ``block_tables[i, t // block_size] * block_size + t % block_size``.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 = padding, not written
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, cached tokens after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    block_size: int
    max_query_len: int  # host-side upper bounds, so no kernel launch reads a length from device
    max_seq_len: int
    # Host copies (the scheduler has them anyway); the CPU reference path plans with them.
    query_lens_host: list[int] = field(default_factory=list)
    seq_lens_host: list[int] = field(default_factory=list)
    # Backend-private per-step plan (built once per step by backend.prepare, reused by all layers).
    plan: Any = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]
