"""DraftWorker: the draft model of speculative decoding, with its own paged KV pool.

Its pool has as many blocks as the target's and is indexed by the target's block tables, so a
sequence's draft KV lives in the same block ids as its target KV (copy-on-write copies are
replayed on both pools). Per step it proposes k tokens per sequence in k batched forwards: the
first feeds what the draft has not seen yet (the whole prompt after a preemption or the first
time, else the last one or two tokens), each next one feeds the previous proposal. Greedy
requests get the draft's argmax; sampled ones a draw from the draft's own processed
distribution q (same temperature / top-k / top-p / min-p / penalties), returned so the target
can verify losslessly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raylm.workers.config import CacheConfig, ModelConfig
from raylm.workers.model_input import ModelInput, SamplingMetadata

DRAFT_SEED_SALT = 0x2545F4914F6CDD1D  # the draft's draws use their own random stream


@dataclass
class DraftRequest:
    """One sequence to draft for."""

    token_ids: list[int]  # what the draft feeds first: positions start_pos.. (>= 1 token)
    start_pos: int
    block_ids: list[int]
    k: int
    history: list[int]  # output tokens so far (penalties)
    prompt_ids: list[int] | None  # for penalties only


@dataclass
class DraftBatch:
    requests: list[DraftRequest]
    sampling: SamplingMetadata  # one row per request, for its first proposal (step ids = base)
    banned_rounds: list[int]  # rounds j < banned_rounds[i] mask sampling.banned_token_ids[i]
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)
    return_probs: bool = False


class DraftWorker:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, *, num_blocks: int,
                 max_num_batched_tokens: int, max_num_seqs: int,
                 model_thread: bool = False) -> None:
        # As a Ray actor (model_thread=True) the model is built and run on one thread of its
        # own, as a tensor-parallel Worker is (workers/worker.py says why).
        from raylm.workers.worker import ModelThread

        self._on_model_thread = ModelThread(model_thread, "raylm-draft").run
        self._on_model_thread(self._build, model_config, cache_config, num_blocks,
                              max_num_batched_tokens, max_num_seqs)

    def _build(self, model_config: ModelConfig, cache_config: CacheConfig, num_blocks: int,
               max_num_batched_tokens: int, max_num_seqs: int) -> None:
        from raylm.workers.model_runner import ModelRunner

        self.runner = ModelRunner(model_config, cache_config,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  max_num_seqs=max_num_seqs)
        self.runner.initialize_kv_cache(num_blocks)
        self.vocab_size = self.runner.hf_config.vocab_size

    def run_loop(self, inbox_handle: dict, outbox_handle: dict | None) -> None:
        """As a Ray actor: serve proposals from the engine's channel until told to stop."""
        from raylm.workers.worker import serve_channel

        self._on_model_thread(serve_channel, self.propose, 0, inbox_handle, outbox_handle,
                              "draft")

    @torch.inference_mode()
    def propose(self, batch: DraftBatch) -> tuple[list[list[int]], torch.Tensor | None]:
        """(proposals per request, q [num_requests, k_max, vocab] when asked)."""
        reqs = batch.requests
        k_max = max(r.k for r in reqs)
        drafts: list[list[int]] = [[] for _ in reqs]
        probs = [] if batch.return_probs else None
        block = self.runner.block_size
        feeds = [list(r.token_ids) for r in reqs]
        starts = [r.start_pos for r in reqs]
        for j in range(k_max):
            live = [i for i, r in enumerate(reqs) if j < r.k]
            ids, pos, slots, qlens, slens, tables, rows = [], [], [], [], [], [], []
            for i in live:
                r, feed = reqs[i], feeds[i]
                p = range(starts[i], starts[i] + len(feed))
                ids.extend(feed)
                pos.extend(p)
                slots.extend(r.block_ids[t // block] * block + t % block for t in p)
                qlens.append(len(feed))
                slens.append(starts[i] + len(feed))
                tables.append(r.block_ids)
                rows.append(len(ids) - 1)
            inp = ModelInput(input_ids=ids, positions=pos, slot_mapping=slots, query_lens=qlens,
                             seq_lens=slens, block_tables=tables, logits_indices=rows,
                             sampling=self._round_meta(batch, live, drafts, j),
                             copy_blocks=batch.copy_blocks if j == 0 else [],
                             return_sampling_probs=batch.return_probs)
            out = self.runner.execute(inp)
            for n, i in enumerate(live):
                token = out.sampled_token_ids[n]
                drafts[i].append(token)
                starts[i] += len(feeds[i])
                feeds[i] = [token]
            if probs is not None:
                round_probs = torch.zeros(len(reqs), out.sampling_probs.shape[1])
                round_probs[live] = out.sampling_probs.float().cpu()
                probs.append(round_probs)
        q = torch.stack(probs, dim=1) if probs is not None else None  # [S, k_max, vocab]
        return drafts, q

    @staticmethod
    def _round_meta(batch: DraftBatch, live: list[int], drafts: list[list[int]],
                    j: int) -> SamplingMetadata:
        m = batch.sampling
        pick = lambda values: [values[i] for i in live]  # noqa: E731
        meta = SamplingMetadata(
            temperature=pick(m.temperature), top_k=pick(m.top_k), top_p=pick(m.top_p),
            min_p=pick(m.min_p), repetition_penalty=pick(m.repetition_penalty),
            presence_penalty=pick(m.presence_penalty),
            frequency_penalty=pick(m.frequency_penalty),
            seeds=[None if m.seeds[i] is None else m.seeds[i] ^ DRAFT_SEED_SALT for i in live],
            step_ids=[m.step_ids[i] + j for i in live], num_logprobs=[-1] * len(live))
        if m.banned_token_ids is not None:
            meta.banned_token_ids = [m.banned_token_ids[i] if j < batch.banned_rounds[i] else []
                                     for i in live]
        if meta.needs_penalties:
            meta.prompt_token_ids = [batch.requests[i].prompt_ids for i in live]
            meta.output_token_ids = [batch.requests[i].history + drafts[i] for i in live]
        return meta
