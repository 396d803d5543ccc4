"""Frozen configuration of the data plane: the model, the KV cache, parallelism."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    model: str  # local directory or Hugging Face repo id
    dtype: str = "auto"  # "auto" = the checkpoint's torch_dtype (float32 when it names none)
    device: str = "cpu"
    seed: int = 0
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    revision: str | None = None
    enforce_eager: bool = False  # GPU: never replay decode steps from CUDA graphs

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # "auto" = the model's dtype. A 16-bit cache under an fp32 model halves the KV bytes that
    # decode attention reads (it is memory bound), at the cost of rounding the stored K/V.
    kv_cache_dtype: str = "auto"
    kv_cache_memory: int | None = None  # bytes (CPU); None = a fraction of free RAM
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_blocks_override: int | None = None  # tests: force a tiny pool
    # CPU: map every page of the pool at start-up instead of at its first write in a step
    prefault_kv_cache: bool = False

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_blocks_override is not None and self.num_blocks_override < 1:
            raise ValueError(f"num_blocks_override must be >= 1, got {self.num_blocks_override}")


EXECUTOR_BACKENDS = ("auto", "inprocess", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    # "auto": in this process at tp=1, Ray worker actors otherwise; "ray" forces worker actors
    # even at tp=1 (the model then runs outside the engine's process).
    distributed_executor_backend: str = "auto"

    def __post_init__(self) -> None:
        if (not isinstance(self.tensor_parallel_size, int) or isinstance(self.tensor_parallel_size, bool)
                or self.tensor_parallel_size < 1):
            raise ValueError(
                f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}"
            )
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, "
                             f"got {self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "inprocess" and self.tensor_parallel_size > 1:
            raise ValueError("distributed_executor_backend='inprocess' runs one rank only; "
                             f"tensor_parallel_size={self.tensor_parallel_size} needs 'ray'")

    @property
    def uses_ray(self) -> bool:
        return self.distributed_executor_backend == "ray" or self.tensor_parallel_size > 1
