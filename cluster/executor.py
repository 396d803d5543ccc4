"""Executors run a step's ModelInput on the workers; InProcessExecutor is tp=1 without Ray."""
from __future__ import annotations

from raylm.cluster.config import EngineConfig
from raylm.workers.model_input import ModelInput, ModelOutput


class InProcessExecutor:
    """One ModelRunner in this process (the `LLM` class, most tests, a tp=1 replica)."""

    def __init__(self, config: EngineConfig) -> None:
        if config.parallel.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 needs the Ray executor; "
                             f"got tensor_parallel_size={config.parallel.tensor_parallel_size}")
        from raylm.workers.model_runner import ModelRunner

        self.runner = ModelRunner(config.model, config.cache,
                                  max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                                  max_num_seqs=config.scheduler.max_num_seqs)

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def model_path(self):
        return self.runner.model_path

    @property
    def hf_config(self):
        return self.runner.hf_config

    def execute(self, inp: ModelInput) -> ModelOutput:
        return self.runner.execute(inp)

    def shutdown(self) -> None:
        self.runner = None
