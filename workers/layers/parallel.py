"""Tensor-parallel group of one model instance and the collectives its layers use.

The group is passed explicitly to every parallel layer (no module-global state); with
``size == 1`` every collective is the identity, so single-device runs never touch
``torch.distributed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in its tensor-parallel group."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None = the default group

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tp_rank must be in [0, {self.size}), got {self.rank}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension (same shape on every rank)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE_DEVICE = TPGroup()


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division; a model whose sizes do not split over the group is a user error."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) must be divisible by tp_size ({denominator})")
    return numerator // denominator


def default_weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                          shard_id: Any = None) -> None:
    """Replicated parameter: every rank copies the whole tensor."""
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"weight shape {tuple(loaded_weight.shape)} does not match parameter "
            f"shape {tuple(param.shape)}"
        )
    param.data.copy_(loaded_weight)


def make_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               weight_loader) -> torch.nn.Parameter:
    """An uninitialised (to be loaded) inference parameter carrying its shard loader."""
    param = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.weight_loader = weight_loader
    return param
