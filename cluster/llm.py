"""LLM: the offline batch API over the engine."""
from __future__ import annotations

import atexit
from typing import Sequence as Seq

from raylm.cluster.config import EngineConfig
from raylm.cluster.engine_core import EngineCore
from raylm.cluster.outputs import RequestOutput
from raylm.cluster.sampling_params import SamplingParams


class LLM:
    """``LLM(model, dtype=..., block_size=16, max_num_seqs=256, max_num_batched_tokens=2048,
    kv_cache_memory=None, enable_prefix_caching=True, seed=0, tensor_parallel_size=1)``; see
    EngineConfig.from_kwargs. With ``tensor_parallel_size > 1`` the ranks run as Ray actors
    (a local Ray starts when none is running); ``shutdown()`` (or leaving a ``with`` block, or
    the program's exit) stops them."""

    def __init__(self, model: str, **kwargs) -> None:
        self.engine = EngineCore(EngineConfig.from_kwargs(model, **kwargs))
        if self.engine.config.parallel.uses_ray:
            # Ray worker actors must not outlive the program (in-process needs no cleanup, and
            # registering would keep every LLM alive until exit).
            atexit.register(self.shutdown)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def executor_info(self) -> dict:
        """How the model runs: attention backend, dtypes, threads, and per rank its placement."""
        return self.engine.executor.info

    def shutdown(self) -> None:
        """Stop the workers (a no-op in-process); the LLM is unusable afterwards."""
        self.engine.shutdown()
        atexit.unregister(self.shutdown)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(self, prompts: str | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, use_tqdm: bool = False, priority: Seq[int] | None = None
                 ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is a str or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} items for "
                             f"{len(prompts)} prompts")
        priority = priority or [0] * len(prompts)
        # Validate everything before enqueuing anything: a bad item fails the call cleanly.
        requests = [self.engine.make_request(p, sp, priority=pr)
                    for p, sp, pr in zip(prompts, sampling_params, priority)]
        order = {r.request_id: i for i, r in enumerate(requests)}
        for r in requests:
            self.engine.add_request(r)
        results: list[RequestOutput | None] = [None] * len(requests)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="generate", unit="req")
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step(emit_deltas=False):
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for r in requests:
                self.engine.abort(r.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return results

    def get_stats(self) -> dict:
        return self.engine.get_stats()

    def check_integrity(self) -> None:
        self.engine.check_integrity()
