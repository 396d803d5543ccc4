"""Frozen configuration of the control plane; the data-plane configs live in workers/config.py."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from raylm.workers.config import CacheConfig, ModelConfig, ParallelConfig

SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" | "priority" (lower value = served first)
    max_queued_requests: int | None = None  # None = unbounded
    # Greedy decode steps per executor call where a batch is plain greedy decodes, nothing waits
    # and nobody streams (offline generate; cluster/multi_step.py). 1 = one step per call.
    max_decode_steps: int = 8

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if (not isinstance(self.max_decode_steps, int) or isinstance(self.max_decode_steps, bool)
                or self.max_decode_steps < 1):
            raise ValueError(
                f"max_decode_steps must be an int >= 1, got {self.max_decode_steps!r}")


SPEC_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """``speculative_config={"method": "ngram", "num_speculative_tokens": k, ...}`` or
    ``{"model": D, "num_speculative_tokens": k}`` (method "draft_model", the default when a model
    is given): D must share the target's tokenizer (checked at start)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # the maximum k per step
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None
    # Choose k per step from measured acceptance and step cost (cluster/spec_policy.py); False
    # always proposes up to num_speculative_tokens.
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config.method must be one of {SPEC_METHODS}, "
                             f"got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config.num_speculative_tokens must be in [1, 16], "
                             f"got {k!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config.adaptive must be a bool, got {self.adaptive!r}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.model: a draft model path is required with "
                             "method 'draft_model'")

    @classmethod
    def from_dict(cls, data: dict | None) -> "SpeculativeConfig | None":
        if data is None:
            return None
        if isinstance(data, SpeculativeConfig):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(data).__name__}")
        data = dict(data)
        if "model" in data and "method" not in data:
            data["method"] = "draft_model"
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                 "model", "adaptive"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]} is not a known setting "
                             f"(known: {sorted(known)})")
        return cls(**data)


# stream_interval="auto" on a CPU device: (running requests at least, steps per delta), the
# last row that applies wins; every stream's deltas go on the same steps (EngineCore). A
# served message costs c ~ 0.1-0.15 ms of the step's own cores (the replica's event loop,
# Serve's direct ingress, gRPC or HTTP framing, HAProxy, the client's socket), and about as
# much again in the OpenMP barrier its preempted compute thread holds up, so n streams at k
# steps per delta cost about 2*n*c / (k*t_step(n)) of the step time (t_step ~ 18 ms at 16
# streams, ~22 ms at 24, ~27-30 ms at 32). A client at concurrency C keeps a little under C
# requests running (between one's end and the next one's start), hence 24 for the 32-stream
# level. There a closed-loop gRPC client (320 requests x 128 tokens, 4 runs each, alternated)
# got 0.86-0.94x (mean 0.89) the in-process engine's tokens/s at k = 3 and 0.92-0.97x (mean
# 0.94) at k = 4; `raylm bench serve` at 32 streams, gRPC: k = 2 0.87-0.94x (5 runs), k = 4
# 0.91-0.99x (6 runs) (README, "Serving path").
AUTO_STREAM_INTERVALS = ((16, 2), (24, 4))


def parse_stream_interval(text: str) -> int | str:
    """A --stream-interval flag: "auto" or an int (EngineConfig checks that it is >= 1)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an int >= 1 or 'auto', got {text!r}") from None


def auto_stream_interval(num_running: int, device: str) -> int:
    if device.startswith("cuda"):  # the host's cores are not the ones computing the step
        return 1
    interval = 1
    for min_running, steps in AUTO_STREAM_INTERVALS:
        if num_running >= min_running:
            interval = steps
    return interval


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    # Streaming: send a request's delta every this many steps with tokens (the first token and
    # the last at once). Larger values spend less CPU on messages per token (serving many
    # streams on few cores). "auto": 1, except on a CPU device with many requests running
    # (AUTO_STREAM_INTERVALS), where each message's cost is taken from the step's own cores.
    stream_interval: int | str = 1
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if self.stream_interval != "auto" and (not isinstance(self.stream_interval, int)
                                               or isinstance(self.stream_interval, bool)
                                               or self.stream_interval < 1):
            raise ValueError(f"stream_interval must be an int >= 1 or 'auto', got "
                             f"{self.stream_interval!r}")

    @classmethod
    def from_kwargs(
        cls,
        model: str,
        *,
        dtype: str = "auto",
        device: str | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        revision: str | None = None,
        enforce_eager: bool = False,
        block_size: int = 16,
        kv_cache_dtype: str = "auto",
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        num_blocks_override: int | None = None,
        prefault_kv_cache: bool = False,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_chunked_prefill: bool = True,
        scheduling_policy: str = "fcfs",
        max_queued_requests: int | None = None,
        max_decode_steps: int = 8,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: str = "auto",
        stream_interval: int | str = 1,
        speculative_config: dict | None = None,
    ) -> "EngineConfig":
        if device is None:
            device = _default_device()
        return cls(
            model=ModelConfig(model=model, dtype=dtype, device=device, seed=seed,
                              max_model_len=max_model_len, revision=revision,
                              enforce_eager=enforce_eager),
            cache=CacheConfig(block_size=block_size, kv_cache_dtype=kv_cache_dtype,
                              kv_cache_memory=kv_cache_memory,
                              gpu_memory_utilization=gpu_memory_utilization,
                              enable_prefix_caching=enable_prefix_caching,
                              num_blocks_override=num_blocks_override,
                              prefault_kv_cache=prefault_kv_cache),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      enable_chunked_prefill=enable_chunked_prefill,
                                      policy=scheduling_policy,
                                      max_queued_requests=max_queued_requests,
                                      max_decode_steps=max_decode_steps),
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                    distributed_executor_backend=distributed_executor_backend),
            stream_interval=stream_interval,
            speculative=SpeculativeConfig.from_dict(speculative_config),
        )


def _default_device() -> str:
    # Imported lazily: the control plane's config stays importable without torch.
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
