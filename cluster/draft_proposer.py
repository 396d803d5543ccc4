"""The engine's side of draft-model speculation: what each scheduled sequence asks the
DraftWorker (workers/draft_worker.py) for, and the check that the draft fits the target.

Served (a placement group is current), the DraftWorker is its own Ray actor in bundle 0 of the
replica's group, sharing the bundle (no CPU of its own; DRAFT_GPU_SHARE of the GPU, which the
replica / rank 0 leave free), and is driven through a shared-memory channel like the ranks.
Offline it runs in-process."""
from __future__ import annotations

import logging
from typing import Any

from raylm.cluster.input_builder import SampleGroup, build_sampling_metadata
from raylm.cluster.request import Sequence

logger = logging.getLogger(__name__)

DRAFT_GPU_SHARE = 0.1  # of bundle 0's GPU, reserved for the draft actor when served on GPU


class DraftProposer:
    def __init__(self, draft_model: str, engine_config: Any, num_blocks: int,
                 target_tokenizer: Any) -> None:
        import dataclasses

        from transformers import AutoTokenizer

        from raylm.workers.draft_worker import DraftWorker

        draft_tokenizer = AutoTokenizer.from_pretrained(draft_model)
        if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
            raise ValueError(f"speculative_config.model: {draft_model!r} does not share the "
                             "target's tokenizer (vocabularies differ)")
        model_config = dataclasses.replace(engine_config.model, model=draft_model,
                                           max_model_len=None)
        args = (model_config, engine_config.cache)
        kwargs = dict(num_blocks=num_blocks,
                      max_num_batched_tokens=engine_config.scheduler.max_num_batched_tokens,
                      max_num_seqs=engine_config.scheduler.max_num_seqs)
        self.worker, self.actor, self.channel = None, None, None
        pg = _current_placement_group()
        if pg is None:
            self.worker = DraftWorker(*args, **kwargs)
        else:
            self.actor, self.channel = _start_actor(pg, args, kwargs,
                                                    model_config.device.startswith("cuda"))
        logger.info("draft model %s ready (%s, %d KV blocks on the target's block ids)",
                    draft_model, "in-process" if pg is None else "Ray actor in bundle 0",
                    num_blocks)

    def propose(self, seqs: list[Sequence], copy_blocks: list[tuple[int, int]]
                ) -> tuple[list[list[int]], Any]:
        """Exactly len(seq.spec_token_ids) proposals per sequence, and q when any samples."""
        from raylm.workers.draft_worker import DraftBatch, DraftRequest

        requests, banned_rounds = [], []
        for seq in seqs:
            p = seq.request.params
            num_tokens = seq.num_tokens
            start = min(seq.draft_num_computed, num_tokens - 1)
            requests.append(DraftRequest(
                token_ids=seq.token_ids[start:num_tokens], start_pos=start,
                block_ids=seq.block_ids, k=len(seq.spec_token_ids),
                history=seq.output_token_ids,
                prompt_ids=seq.prompt_token_ids if _needs_penalties(p) else None))
            banned_rounds.append(max(0, p.min_tokens - seq.num_output_tokens))
        meta = build_sampling_metadata([SampleGroup(seq, i, 1) for i, seq in enumerate(seqs)])
        batch = DraftBatch(requests, meta, banned_rounds, list(copy_blocks),
                           return_probs=any(t != 0.0 for t in meta.temperature))
        if self.channel is None:
            return self.worker.propose(batch)
        from raylm.workers.worker import EXECUTE

        result, _ = self.channel.call(EXECUTE, batch)  # WorkerDiedError if the actor is gone
        return result

    def check(self) -> None:
        if self.channel is not None:
            self.channel.check()

    def close(self) -> None:
        if self.channel is not None:
            import ray

            self.channel.close()
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


def _current_placement_group():
    try:
        import ray
        from ray.util import get_current_placement_group
    except ImportError:
        return None
    return get_current_placement_group() if ray.is_initialized() else None


def _start_actor(pg, args, kwargs, on_gpu: bool):
    import uuid

    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from raylm.cluster.channel_client import ChannelClient
    from raylm.cluster.ray_executor import WORKER_NAMESPACE
    from raylm.workers.draft_worker import DraftWorker

    actor = ray.remote(DraftWorker).options(
        num_cpus=0, num_gpus=DRAFT_GPU_SHARE if on_gpu else 0, max_concurrency=2,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        name=f"raylm-draft-{uuid.uuid4().hex[:8]}", namespace=WORKER_NAMESPACE,
    ).remote(*args, model_thread=True, **kwargs)
    ray.get(actor.__ray_ready__.remote())
    return actor, ChannelClient([actor], "draft")


def _needs_penalties(p) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
