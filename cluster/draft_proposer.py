"""The engine's side of draft-model speculation: what each scheduled sequence asks the
DraftWorker (workers/draft_worker.py) for, and the check that the draft fits the target."""
from __future__ import annotations

import logging
from typing import Any

from raylm.cluster.input_builder import SampleGroup, build_sampling_metadata
from raylm.cluster.request import Sequence

logger = logging.getLogger(__name__)


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
        self.worker = DraftWorker(model_config, engine_config.cache, num_blocks=num_blocks,
                                  max_num_batched_tokens=engine_config.scheduler.max_num_batched_tokens,
                                  max_num_seqs=engine_config.scheduler.max_num_seqs)
        logger.info("draft model %s ready (%d KV blocks, same block ids as the target)",
                    draft_model, num_blocks)

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
        return self.worker.propose(batch)


def _needs_penalties(p) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
