"""Training samples (prompt + continuation token ids) and their padded batch tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sample:
    """One sequence: ``token_ids`` = prompt + continuation; the first ``prompt_len`` are prompt."""

    token_ids: tuple[int, ...]
    prompt_len: int

    def __post_init__(self) -> None:
        assert 1 <= self.prompt_len < len(self.token_ids), (self.prompt_len, len(self.token_ids))

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def generated_ids(self) -> tuple[int, ...]:
        return self.token_ids[self.prompt_len:]


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors of a list of samples. ``gen_mask`` marks the positions whose *next*
    token was generated (prompt_len - 1 .. len - 2): the logits there are what a draft proposes
    and what the loss compares; the prompt and the padding are masked out."""

    input_ids: torch.Tensor  # [batch, max_len] int64
    attention_mask: torch.Tensor  # [batch, max_len] int64, 1 = real token
    gen_mask: torch.Tensor  # [batch, max_len] bool
    num_positions: int  # gen_mask.sum(): the loss rows, in row-major order of gen_mask

    @classmethod
    def collate(cls, samples: list[Sample], pad_id: int, device: torch.device | str) -> "Batch":
        assert samples
        max_len = max(len(s.token_ids) for s in samples)
        input_ids = torch.full((len(samples), max_len), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), max_len), dtype=torch.long)
        gen_mask = torch.zeros((len(samples), max_len), dtype=torch.bool)
        for i, s in enumerate(samples):
            n = len(s.token_ids)
            input_ids[i, :n] = torch.tensor(s.token_ids)
            attention_mask[i, :n] = 1
            gen_mask[i, s.prompt_len - 1:n - 1] = True
        return cls(input_ids.to(device), attention_mask.to(device), gen_mask.to(device),
                   sum(s.num_generated for s in samples))
