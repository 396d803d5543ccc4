"""The scheduler: a token budget per step closes each sequence's gap between computed and total.

No prefill/decode phases: a decode is a 1-token gap, a prompt chunk a larger one, a preempted
sequence a gap from 0. Pure Python (DESIGN.md section 3).
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from raylm.cluster.config import SchedulerConfig
from raylm.cluster.kv_cache_manager import KVCacheManager
from raylm.cluster.request import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens fed this step, starting at start_pos
    start_pos: int  # num_computed_tokens before this step
    # After this step the sequence has computed all its tokens: it samples the next one.
    samples: bool = False

    def __post_init__(self) -> None:
        end = self.seq.num_tokens + len(self.seq.spec_token_ids)
        self.samples = self.start_pos + self.num_new_tokens == end


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: list[Sequence] = []  # sorted by sort_key (priority, arrival)
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=self._key)

    def _key(self, seq: Sequence) -> tuple:
        """FCFS orders by arrival only; the priority policy by (priority, arrival)."""
        key = seq.sort_key
        return key[1:] if self.config.policy == "fcfs" else key

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence from the queues and free its blocks (finish or abort)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

    def add_running(self, seq: Sequence) -> None:
        """A fork that already shares its parent's computed blocks joins the running set."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput(scheduled=[])
        scheduled_ids: set[int] = set()

        # 1. Running sequences first: decodes and the next chunks of long prompts.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            gap = seq.num_tokens - seq.num_computed_tokens
            if seq.spec_token_ids and gap + len(seq.spec_token_ids) > budget:
                seq.spec_token_ids = []  # no room to verify this step: decode plainly
            # Draft tokens count in the budget and get slots (lookahead) like any other token.
            num_new = min(gap + len(seq.spec_token_ids), budget)
            if num_new <= 0:
                i += 1
                continue
            copies = self.kv.allocate_slots(seq, num_new)
            while copies is None:
                victim = self._pick_victim(scheduled_ids)
                self._preempt(victim, out)
                if victim is seq:
                    break
                copies = self.kv.allocate_slots(seq, num_new)
            if seq.status is not SeqStatus.RUNNING:
                continue  # it preempted itself: the next sequence moved into slot i
            out.copy_blocks.extend(copies)
            out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens))
            scheduled_ids.add(seq.seq_id)
            budget -= num_new
            i = self.running.index(seq) + 1 if out.preempted else i + 1

        # 2. Waiting sequences, in priority / arrival order, while budget and blocks last.
        #    Not after a preemption: the pool is short, admitting more would thrash.
        while (self.waiting and budget > 0 and not out.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            hits, num_hit_tokens = self.kv.get_computed_blocks(seq)
            num_new = seq.num_tokens - num_hit_tokens
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            copies = self.kv.allocate_slots(seq, num_new, hits)
            if copies is None:
                break
            self.waiting.pop(0)
            seq.num_computed_tokens = num_hit_tokens
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = time.monotonic()
                seq.num_cached_tokens = num_hit_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.copy_blocks.extend(copies)
            out.scheduled.append(ScheduledSeq(seq, num_new, num_hit_tokens))
            scheduled_ids.add(seq.seq_id)
            budget -= num_new

        if not out.scheduled and self.waiting and self.running:
            self._preempt_idle_for(self.waiting[0], out)

        # Optimistic: the executor computes these tokens this step.
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
        return out

    def _pick_victim(self, scheduled_ids: set[int]) -> Sequence:
        """The lowest-priority, newest running sequence not already fed this step."""
        candidates = [s for s in self.running if s.seq_id not in scheduled_ids]
        assert candidates, "nothing left to preempt"
        return max(candidates, key=lambda s: s.sort_key)

    def _preempt_idle_for(self, head: Sequence, out: SchedulerOutput) -> None:
        """Nothing could run: every running sequence waits for the rest of its group (beams,
        contrastive candidates) while a waiting sequence cannot get blocks. Free the newest idle
        one if it is newer than the waiting head, one per step until the head fits."""
        victim = max(self.running, key=self._key)
        if self._key(victim) > self._key(head):
            self._preempt(victim, out)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Preempt by recompute: free the blocks, requeue; prefix caching may restore them."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.draft_num_computed = 0
        seq.request.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)
        self.add(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        self.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
