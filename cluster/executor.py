"""Executors run a step's ModelInput on the workers and hand back rank 0's ModelOutput.

``make_executor(config)`` picks one: ``InProcessExecutor`` (tp=1, no Ray: offline ``LLM``, most
tests, tp=1 replicas) or ``RayExecutor`` (one Worker actor per rank in a placement group,
cluster/ray_executor.py). The engine talks only to this interface; nothing outside an executor
reaches into a runner.
"""
from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from typing import Any

from raylm.cluster.config import EngineConfig
from raylm.workers.model_input import ModelInput, ModelOutput

logger = logging.getLogger(__name__)


class Executor(abc.ABC):
    """What the engine needs from the data plane."""

    model_path: Any  # pathlib.Path of the resolved checkpoint
    hf_config: Any  # transformers config
    num_blocks: int  # KV blocks of the pool (the same on every rank)
    info: dict[str, Any]  # rank 0's description: attention backend, dtypes, threads, placement

    @abc.abstractmethod
    def execute(self, inp: ModelInput) -> ModelOutput:
        """Run one step on every rank; raises WorkerDiedError if a rank is gone."""

    def check_health(self) -> None:
        """Raise if a rank is gone (Serve's health check calls this through the engine)."""

    def get_stats(self) -> dict[str, Any]:
        return {}

    def set_compute_hook(self, hook: Callable[[], None] | None) -> bool:
        """Have ``hook`` called once per step in this process, right before the model's compute
        starts; False where the compute runs elsewhere (rank actors: no GIL shared)."""
        return False

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the workers and release what they hold. Idempotent."""


class InProcessExecutor(Executor):
    """One Worker (rank 0 of 1) in this process."""

    def __init__(self, config: EngineConfig) -> None:
        if config.parallel.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 needs the Ray executor; "
                             f"got tensor_parallel_size={config.parallel.tensor_parallel_size}")
        from raylm.workers.worker import Worker

        self.worker = Worker(rank=0, tp_size=1)
        capacity = self.worker.load_model(
            config.model, config.cache,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_num_seqs=config.scheduler.max_num_seqs)
        self.info = self.worker.initialize_kv_cache(capacity)
        self.num_blocks = capacity
        self.model_path = self.worker.runner.model_path
        self.hf_config = self.worker.runner.hf_config

    def execute(self, inp: ModelInput) -> ModelOutput:
        return self.worker.execute(inp)

    def set_compute_hook(self, hook: Callable[[], None] | None) -> bool:
        self.worker.runner.compute_hook = hook
        return True

    def shutdown(self) -> None:
        self.worker = None


def make_executor(config: EngineConfig) -> Executor:
    if config.parallel.uses_ray:
        from raylm.cluster.ray_executor import RayExecutor

        return RayExecutor(config)
    return InProcessExecutor(config)
