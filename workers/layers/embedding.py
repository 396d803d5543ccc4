"""Vocab-parallel token embedding and LM head.

Rank r holds rows ``[r * n, (r + 1) * n)`` of the ``[vocab_size, hidden]`` table with
``n = ceil(vocab_size / tp_size)``; rows past the vocabulary are zero padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raylm.kernels.linear import linear

from raylm.workers.layers.parallel import SINGLE_DEVICE, TPGroup, make_param, materialize


class VocabParallelEmbedding(torch.nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype,
                 device: torch.device, tp: TPGroup = SINGLE_DEVICE) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.num_rows_per_rank = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.num_rows_per_rank
        self.vocab_end = min(self.vocab_start + self.num_rows_per_rank, vocab_size)
        self.weight = make_param((self.num_rows_per_rank, hidden_size), dtype, device,
                                 self.weight_loader)

    def weight_loader(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id=None) -> None:
        if loaded_weight.shape[0] != self.vocab_size or loaded_weight.shape[1] != param.shape[1]:
            raise ValueError(
                f"embedding shape {tuple(loaded_weight.shape)} does not match "
                f"(vocab_size={self.vocab_size}, hidden_size={param.shape[1]})"
            )
        rows = self.vocab_end - self.vocab_start
        param.data[rows:].zero_()
        param.data[:rows].copy_(materialize(loaded_weight.narrow(0, self.vocab_start, rows)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids owned by other ranks look up row 0 and are zeroed; the all-reduce fills them in.
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(owned, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h E^T over the (sharded) vocabulary, gathered on rank 0 only (the rank that
    samples); the other ranks get None. Shards are padded to equal size, so a vocabulary that
    does not divide by tp still gathers in one collective."""

    packed_weight: torch.Tensor | None = None  # oneDNN's copy of the weight (prepare_cpu_linears)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:  # [num_rows, vocab] fp32
        logits = linear(hidden, self.weight, None, self.packed_weight)  # [num_rows, vocab_size / tp (padded)]
        if self.tp.size > 1:
            logits = self.tp.gather_last_dim_to_first(logits)
            if logits is None:
                return None
            logits = logits[:, : self.vocab_size]
        return logits.float()
