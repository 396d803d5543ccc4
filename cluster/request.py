"""Request and sequence state (pure Python).

A ``Request`` is what a client sent; it owns one or more ``Sequence``s (n > 1, beams). The
scheduler works on sequences: each has ``num_computed_tokens`` catching up with ``num_tokens``.
"""
from __future__ import annotations

import enum
import itertools
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raylm.cluster.sampling_params import SamplingParams

_seq_counter = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One token stream with its own KV blocks."""

    def __init__(self, request: "Request", token_ids: list[int], num_prompt_tokens: int,
                 index: int = 0) -> None:
        self.seq_id = next(_seq_counter)
        self.request = request
        self.index = index  # position among the request's outputs
        self.token_ids = token_ids  # prompt + output
        self.num_prompt_tokens = num_prompt_tokens
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.status = SeqStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self.output_logprobs: list[dict[int, float]] = []
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache (first schedule)
        # Proposed next tokens (speculative decoding), fed after token_ids and verified this
        # step; never part of token_ids until accepted.
        self.spec_token_ids: list[int] = []
        self.draft_num_computed = 0  # leading tokens whose KV the draft model's pool holds
        self.detokenizer: Any = None  # IncrementalDetokenizer, set by the engine
        # Structured output: the grammar matcher (llguidance), advanced with every token.
        self.grammar: Any = None
        # Streaming cursors: what the previous RequestOutput already carried.
        self.num_emitted_tokens = 0
        self.num_emitted_chars = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Lower sorts first: served earlier, preempted later."""
        return (self.request.priority, self.request.arrival_time, self.seq_id)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens}, {self.status.value})")


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: "SamplingParams", *, priority: int = 0,
                 arrival_time: float | None = None, eos_token_ids: frozenset[int] = frozenset()):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.eos_token_ids = eos_token_ids
        self.seqs: list[Sequence] = [Sequence(self, list(prompt_token_ids), len(prompt_token_ids))]
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_preemptions = 0
        self.aborted = False
        self.decoder: Any = None  # a cluster.decoding.Decoder, set by the engine
        self.cache_salt: str | None = None  # isolates this request's prefix-cache entries
        self.spec_acceptance: float | None = None  # moving acceptance rate of its drafts
        self.prompt_logprobs: list[dict[int, float] | None] | None = None  # when asked
        self.streamed_any = False

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
