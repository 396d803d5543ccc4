"""Speculative decoding in the engine: propose before scheduling, accept after verifying.

Each step, every eligible decoding sequence gets up to k proposed tokens (``spec_token_ids``).
The scheduler counts them in the token budget and allocates their slots (lookahead); the input
builder feeds them after the sequence's last token and asks for k + 1 logits rows; the runner's
rejection sampler (workers/rejection_sampler.py) turns those rows into the emitted tokens:
accepted drafts then one correction / bonus token, so every verified sequence gains 1..k + 1
tokens per step with exactly the target's distribution. ``accept`` appends them (stop
conditions apply token by token), rolls ``num_computed_tokens`` back to the accepted length,
frees the lookahead blocks only rejected drafts used, and only then publishes full blocks to the
prefix cache (a block holding a rejected draft is never published).

How many tokens to propose is chosen each step by ``AdaptiveK`` (cluster/spec_policy.py): the k
that maximises expected emitted tokens per second of step time, 0 when the batch is compute
bound.

Eligible: greedy or sampled requests (n >= 1 once forked) without per-token logprobs; beam and
contrastive search run without speculation in the same batch. Pure Python.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import time

from raylm.cluster.decoding import EngineOps, SamplingDecoder
from raylm.cluster.errors import WorkerDiedError
from raylm.cluster.request import SeqStatus, Sequence
from raylm.cluster.spec_policy import PRIOR_ACCEPTANCE

if TYPE_CHECKING:
    from raylm.cluster.config import SpeculativeConfig
    from raylm.cluster.draft_proposer import DraftProposer
    from raylm.cluster.kv_cache_manager import KVCacheManager
    from raylm.cluster.scheduler import SchedulerOutput


logger = logging.getLogger(__name__)
ACCEPTANCE_DECAY = 0.8  # per-request moving average of the acceptance rate


class Speculator:
    def __init__(self, config: "SpeculativeConfig", max_model_len: int,
                 draft: "DraftProposer | None" = None) -> None:
        from raylm.cluster.spec_policy import AdaptiveK
        from raylm.workers.ngram_proposer import NgramProposer  # pure Python

        self.config = config
        self.max_model_len = max_model_len
        self.policy = AdaptiveK(config.num_speculative_tokens)
        self.proposer = NgramProposer(config.prompt_lookup_max, config.prompt_lookup_min)
        self.draft = draft  # proposes after scheduling (its KV needs the lookahead slots)
        self.enabled = True  # False once a draft model's worker died
        self.draft_seconds = 0.0  # time in draft forwards
        self.target_seconds = 0.0  # time in the target's steps
        k = config.num_speculative_tokens
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_verified_seqs = 0  # verification rounds (one per sequence per step)
        self.accepted_per_position = [0] * k  # how often draft j was accepted
        self.drafted_per_position = [0] * k

    def _eligible(self, seq: Sequence) -> bool:
        request = seq.request
        decoder = request.decoder
        return (seq.status is SeqStatus.RUNNING
                and seq.num_computed_tokens == seq.num_tokens - 1  # decoding, not prefilling
                and isinstance(decoder, SamplingDecoder) and decoder.forked
                and request.params.logprobs is None
                # a grammar's mask covers one position per step: no drafts to verify
                and seq.grammar is None)

    def propose(self, running: list[Sequence], num_base_tokens: int) -> None:
        """Set each eligible sequence's proposals for this step (others get none).
        ``num_base_tokens``: what the step would feed without speculation."""
        if not self.enabled and self.draft is not None:
            self.draft.close()
            self.draft = None
        candidates, caps = [], []
        for seq in running:
            seq.spec_token_ids = []
            if self.enabled and self._eligible(seq):
                # Never past max_tokens (the last emitted token is the target's own) nor past
                # the context.
                cap = min(seq.request.params.max_tokens - seq.num_output_tokens - 1,
                          self.max_model_len - seq.num_tokens - 1)
                if cap > 0:
                    candidates.append(seq)
                    caps.append(cap)
        if not candidates:
            return
        prior = self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens \
            else PRIOR_ACCEPTANCE
        acceptances = [s.request.spec_acceptance if s.request.spec_acceptance is not None
                       else prior for s in candidates]
        k = (self.policy.choose(num_base_tokens, acceptances, caps) if self.config.adaptive
             else self.config.num_speculative_tokens)
        for seq, cap in zip(candidates, caps):
            if min(k, cap) > 0:
                # A draft model always proposes exactly k: reserve the slots now, fill them in
                # fill_drafts once the scheduler has allocated them.
                seq.spec_token_ids = ([0] * min(k, cap) if self.draft is not None
                                      else self.proposer.propose(seq.token_ids, min(k, cap)))

    def fill_drafts(self, sched: "SchedulerOutput") -> object | None:
        """Draft-model proposals for the scheduled sequences that kept their reservation;
        returns the draft's q for ModelInput.spec_draft_probs (None when all are greedy)."""
        if self.draft is None:
            return None
        seqs = [s.seq for s in sched.scheduled if s.seq.spec_token_ids]
        if not seqs:
            return None
        start = time.perf_counter()
        try:
            drafts, q = self.draft.propose(seqs, sched.copy_blocks)
        except WorkerDiedError as exc:
            self._lose_draft(sched, exc)
            return None
        elapsed = time.perf_counter() - start
        self.draft_seconds += elapsed
        self.policy.observe_draft(len(seqs), max(len(d) for d in drafts), elapsed)
        for seq, d in zip(seqs, drafts):
            seq.spec_token_ids = d
        return q

    def _lose_draft(self, sched: "SchedulerOutput", exc: Exception) -> None:
        """The draft's actor died: serve on without speculation (the target's output does not
        depend on it); this step's reservations become plain decodes."""
        logger.error("the draft model's worker died (%s); serving on without speculation", exc)
        self.draft.close()
        self.draft = None
        self.enabled = False
        for s in sched.scheduled:
            k = len(s.seq.spec_token_ids)
            if k:
                s.num_new_tokens -= k
                s.seq.num_computed_tokens -= k
                s.seq.spec_token_ids = []
                s.samples = True

    def check(self) -> None:
        """Notice a dead draft actor between steps too (the replica's health check)."""
        if self.draft is None or not self.enabled:
            return
        try:
            self.draft.check()
        except WorkerDiedError as exc:
            # Called from the server's thread: only flag it; the step thread lets the draft go.
            logger.error("the draft model's worker died (%s); serving on without speculation",
                         exc)
            self.enabled = False

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.target_seconds += seconds
        self.policy.observe_step(num_tokens, seconds)

    def accept(self, seq: Sequence, tokens: list[int], ops: EngineOps,
               kv: "KVCacheManager") -> None:
        """Apply one verification's result: ``tokens`` are the k + 1 rows' emitted tokens,
        -1 past the emitted ones."""
        num_drafts = len(seq.spec_token_ids)
        seq.spec_token_ids = []
        emitted = [t for t in tokens if t >= 0]
        assert 1 <= len(emitted) <= num_drafts + 1, (tokens, num_drafts)
        num_accepted = len(emitted) - 1
        self.num_verified_seqs += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        rate = num_accepted / num_drafts
        previous = seq.request.spec_acceptance
        seq.request.spec_acceptance = rate if previous is None else \
            ACCEPTANCE_DECAY * previous + (1 - ACCEPTANCE_DECAY) * rate
        for j in range(num_drafts):
            self.drafted_per_position[j] += 1
            self.accepted_per_position[j] += j < num_accepted
        num_tokens_before = seq.num_tokens
        for token in emitted:
            if ops.append_token(seq, token, None):
                return  # finished (stop, EOS, max_tokens): its blocks are already freed
        # The KV of the last real token and of the accepted drafts is valid; the newest token
        # is computed next step.
        seq.num_computed_tokens = seq.num_tokens - 1
        # The draft fed the last real token and its first k - 1 proposals.
        seq.draft_num_computed = min(seq.num_computed_tokens, num_tokens_before + num_drafts - 1)
        kv.trim(seq)
        kv.cache_full_blocks(seq)

    def get_stats(self) -> dict:
        drafted = self.num_draft_tokens
        return {
            "spec_num_draft_tokens": drafted,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": self.num_accepted_tokens / drafted if drafted else 0.0,
            # tokens emitted per verification round (1 = nothing accepted)
            "spec_mean_acceptance_length": (1 + self.num_accepted_tokens / self.num_verified_seqs
                                            if self.num_verified_seqs else 0.0),
            "spec_current_k": self.policy.last_k if self.enabled else 0,
            "spec_draft_time_fraction": (
                self.draft_seconds / (self.draft_seconds + self.target_seconds)
                if self.draft_seconds + self.target_seconds else 0.0),
            "spec_enabled": int(self.enabled),
            "spec_acceptance_rate_per_position": [
                a / d if d else 0.0
                for a, d in zip(self.accepted_per_position, self.drafted_per_position)],
        }
