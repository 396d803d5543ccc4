"""Linear layers that know how they shard over a tensor-parallel group (DESIGN.md section 6).

Column-parallel layers split the output features (each rank computes a slice, no communication);
row-parallel layers split the input features and all-reduce the partial sums. Each weight's
``weight_loader(param, loaded_weight, shard_id)`` copies only this rank's slice of the full
checkpoint tensor, so sharding happens while loading.
"""
from __future__ import annotations

import torch

from raylm.kernels import linear_plan
from raylm.kernels.linear import can_pack, linear, pack_weight

from raylm.workers.layers.parallel import SINGLE_DEVICE, TPGroup, divide, make_param, materialize


class ColumnParallelLinear(torch.nn.Module):
    """y = x W^T (+ b) with W split along the output dimension; output stays sharded."""

    packed_weight: torch.Tensor | None = None  # oneDNN's copy of the weight (prepare_cpu_linears)

    def __init__(self, input_size: int, output_size: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device, tp: TPGroup = SINGLE_DEVICE) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_size_per_rank = divide(output_size, tp.size, "output features")
        shape = (self.output_size_per_rank, input_size)
        self.weight = make_param(shape, dtype, device, self.weight_loader)
        self.bias = (make_param((self.output_size_per_rank,), dtype, device, self.weight_loader)
                     if bias else None)

    def weight_loader(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id=None) -> None:
        size = param.shape[0]
        _copy(param.data, loaded_weight.narrow(0, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, out / tp]
        return linear(x, self.weight, self.bias, self.packed_weight)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate_up)."""

    def __init__(self, input_size: int, output_sizes: list[int], *, bias: bool,
                 dtype: torch.dtype, device: torch.device, tp: TPGroup = SINGLE_DEVICE) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias, dtype=dtype, device=device,
                         tp=tp)

    def weight_loader(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: int | None = None) -> None:
        assert shard_id is not None, "merged projections are loaded one shard at a time"
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        shard = loaded_weight.narrow(0, self.tp.rank * size, size)
        _copy(param.data.narrow(0, offset, size), shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; heads split over ranks.

    When the group is larger than the number of KV heads, each KV head is replicated on
    ``tp_size // num_kv_heads`` consecutive ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, *,
                 bias: bool, dtype: torch.dtype, device: torch.device,
                 tp: TPGroup = SINGLE_DEVICE) -> None:
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.size, "num_attention_heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = divide(num_kv_heads, tp.size, "num_key_value_heads")
            self.kv_shard_rank = tp.rank
        else:
            if tp.size % num_kv_heads:
                raise ValueError(f"tp_size ({tp.size}) must be a multiple of "
                                 f"num_key_value_heads ({num_kv_heads}) when it is larger")
            replicas = tp.size // num_kv_heads
            self.num_kv_heads = 1
            self.kv_shard_rank = tp.rank // replicas
        self.q_size = self.num_heads * head_dim  # per rank
        self.kv_size = self.num_kv_heads * head_dim  # per rank
        output_size = (self.q_size + 2 * self.kv_size) * tp.size
        super().__init__(hidden_size, output_size, bias=bias, dtype=dtype, device=device, tp=tp)

    def weight_loader(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str | None = None) -> None:
        if shard_id == "q":
            offset, size, shard_rank = 0, self.q_size, self.tp.rank
        elif shard_id == "k":
            offset, size, shard_rank = self.q_size, self.kv_size, self.kv_shard_rank
        elif shard_id == "v":
            offset, size, shard_rank = self.q_size + self.kv_size, self.kv_size, self.kv_shard_rank
        else:
            raise AssertionError(f"qkv shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        shard = loaded_weight.narrow(0, shard_rank * size, size)
        _copy(param.data.narrow(0, offset, size), shard)


class RowParallelLinear(torch.nn.Module):
    """y = sum over ranks of x_r W_r^T (+ b): W split along the input dimension."""

    packed_weight: torch.Tensor | None = None  # oneDNN's copy of the weight (prepare_cpu_linears)

    def __init__(self, input_size: int, output_size: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device, tp: TPGroup = SINGLE_DEVICE) -> None:
        super().__init__()
        self.tp = tp
        self.input_size_per_rank = divide(input_size, tp.size, "input features")
        self.weight = make_param((output_size, self.input_size_per_rank), dtype, device,
                                 self.weight_loader)
        self.bias = make_param((output_size,), dtype, device, self.bias_loader) if bias else None

    def weight_loader(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id=None) -> None:
        size = param.shape[1]
        _copy(param.data, loaded_weight.narrow(1, self.tp.rank * size, size))

    def bias_loader(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                    shard_id=None) -> None:
        _copy(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, output_size]
        if self.tp.size == 1:
            return linear(x, self.weight, self.bias, self.packed_weight)
        out = self.tp.all_reduce(linear(x, self.weight, None, self.packed_weight))
        # The bias is added once, after the reduction, not once per rank.
        return out if self.bias is None else out + self.bias


def prepare_cpu_linears(model: torch.nn.Module) -> int:
    """Measure the CPU matmul plan on ``model``'s own linear weights (kernels/linear_plan.py)
    and keep a oneDNN-packed copy of each weight whose shape the plan runs packed at some row
    count. Layers opt in with a ``packed_weight`` attribute. Returns the bytes the copies add."""
    layers = [m for m in model.modules() if hasattr(m, "packed_weight")
              and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    shape = {id(m): (m.weight.shape[1], m.weight.shape[0]) for m in layers}
    # pack what calibration has to time (new shapes), then keep what the plan uses
    trial = {id(m): pack_weight(m.weight) for m in layers
             if linear_plan.linear_impl() == "auto" and can_pack(m.weight)
             and not linear_plan.measured(*shape[id(m)])}
    linear_plan.calibrate([m.weight for m in layers], [trial.get(id(m)) for m in layers])
    added = 0
    for m in layers:
        if can_pack(m.weight) and linear_plan.packs(*shape[id(m)]):
            m.packed_weight = trial.get(id(m))
            if m.packed_weight is None:
                m.packed_weight = pack_weight(m.weight)
            added += m.weight.numel() * m.weight.element_size()
    return added


def _copy(dst: torch.Tensor, src) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(
            f"checkpoint shard shape {tuple(src.shape)} does not match parameter shard "
            f"shape {tuple(dst.shape)}"
        )
    dst.copy_(materialize(src))
