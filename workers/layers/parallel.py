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

    def gather_last_dim_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's ``x`` concatenated along the last dimension on rank 0 only; None on the
        other ranks (the LM head: only rank 0 samples, so nobody else needs the logits)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=self._global_rank(0), group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)


SINGLE_DEVICE = TPGroup()


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division; a model whose sizes do not split over the group is a user error."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) must be divisible by tp_size ({denominator})")
    return numerator // denominator


def materialize(weight: Any) -> torch.Tensor:
    """A checkpoint tensor in memory: loaders receive lazy slices of the file (see
    ``loader.CheckpointTensor``) and read only the rows they keep."""
    return weight if isinstance(weight, torch.Tensor) else weight.load()


def default_weight_loader(param: torch.nn.Parameter, loaded_weight: Any,
                          shard_id: Any = None) -> None:
    """Replicated parameter: every rank copies the whole tensor."""
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ValueError(
            f"weight shape {tuple(loaded_weight.shape)} does not match parameter "
            f"shape {tuple(param.shape)}"
        )
    param.data.copy_(materialize(loaded_weight))


def make_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               weight_loader) -> torch.nn.Parameter:
    """An uninitialised (to be loaded) inference parameter carrying its shard loader."""
    param = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.weight_loader = weight_loader
    return param
